//! Apply errors.
//!
//! The split matters to the caller: a [`ApplyError::Refused`] op is skipped for good (the
//! source is told and the stream goes on), an [`ApplyError::Io`] op is *not* applied and must
//! be retried later (a full disk, say) so that nothing is lost, and anything else ends the
//! session.

use std::io;
use std::path::PathBuf;

/// Errors from applying ops or managing replica state.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The op can never be applied (a hostile or impossible path, a forbidden file type): it
    /// is skipped and reported.
    #[error("op {seq} ({kind}) refused: {reason}")]
    Refused {
        /// Its sequence.
        seq: u64,
        /// Op kind.
        kind: &'static str,
        /// Why.
        reason: String,
    },
    /// The op could not be applied now (out of space, I/O error); nothing after it is applied
    /// until it succeeds.
    #[error("op {seq} ({kind}) on {path:?} failed: {source}")]
    Io {
        /// Its sequence.
        seq: u64,
        /// Op kind.
        kind: &'static str,
        /// The path involved.
        path: String,
        /// The error.
        source: io::Error,
    },
    /// The op would take its source over a quota: like a full disk, nothing after it is
    /// applied until it fits (the quota is raised).
    #[error("op {seq} ({kind}): {over}")]
    OverQuota {
        /// Its sequence.
        seq: u64,
        /// Op kind.
        kind: &'static str,
        /// The limit and the numbers.
        over: crate::quota::OverQuota,
    },
    /// Records arrived out of order (a gap): the session is broken.
    #[error("sequence gap: expected op {expected}, got {got}")]
    Gap {
        /// Next expected.
        expected: u64,
        /// Received.
        got: u64,
    },
    /// The replica's state directory is in a format this build does not read.
    #[error(transparent)]
    Format(#[from] doppel_fs::format::FormatError),
    /// The replica's own state files could not be read or written.
    #[error("replica state {path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

impl ApplyError {
    /// Whether this is an out-of-space condition (the caller pauses instead of failing).
    pub fn is_no_space(&self) -> bool {
        match self {
            ApplyError::Io { source, .. } | ApplyError::State { source, .. } => {
                matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
            }
            _ => false,
        }
    }
}
