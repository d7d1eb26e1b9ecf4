//! Agent errors: what stops a job.

use std::io;
use std::path::PathBuf;

/// Errors that stop a job. Link failures are not among them (the link reconnects by itself);
/// a refusal by the target that retrying cannot fix is.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A local file or directory problem.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The job is misconfigured.
    #[error("{0}")]
    Config(String),
    /// Another agent runs this job already.
    #[error("job {job:?} is already being protected by another doppel process (lock {lock})")]
    Locked {
        /// The job.
        job: String,
        /// The lock file.
        lock: PathBuf,
    },
    /// A local destination is the replica of a job running now (in this process or another).
    #[error(
        "the destination {dest} is the replica of a job that is running now; give each job a directory of its own"
    )]
    DestinationInUse {
        /// The destination.
        dest: PathBuf,
    },
    /// A local destination new to the job holds files: the first mirror would make it equal
    /// to the source, deleting them.
    #[error(
        "the destination {dest} is not empty and is not this job's replica: the mirror would delete what it holds \
         that the source has not; choose an empty directory, or pass --seeded (`seeded = true`) if it holds a copy \
         of the source to start from"
    )]
    DestinationNotEmpty {
        /// The destination.
        dest: PathBuf,
    },
    /// The job's state directory is in a format this build does not read.
    #[error(transparent)]
    Format(#[from] doppel_fs::format::FormatError),
    /// The spool failed.
    #[error(transparent)]
    Spool(#[from] doppel_spool::SpoolError),
    /// Reconciling failed.
    #[error(transparent)]
    Mirror(#[from] doppel_mirror::MirrorError),
    /// The node identity is unusable.
    #[error(transparent)]
    Identity(#[from] doppel_link::IdentityError),
    /// The target refused this source for a reason retrying cannot fix.
    #[error("target refused: {0}")]
    Refused(doppel_proto::Refusal),
    /// The capture stopped seeing changes behind the agent's back (the guest of a vm job is
    /// A replica listing did not arrive whole.
    #[error("the replica listing is incomplete: {0}")]
    Listing(String),
    /// gone, or QEMU ended its mirror): the job stops, and its next start compares.
    #[error("capture lost: {0}; the job stops, and its next start compares the disks with the replica")]
    CaptureLost(String),
    /// The TLS client configuration for a remote target could not be built.
    #[error(transparent)]
    Tls(#[from] doppel_link::tls::TlsSetupError),
}

/// Why a request to a running job (settle, verify) got no answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The job is stopping (or stopped).
    #[error("the job is stopping")]
    Stopping,
    /// A `watch` job has not started streaming yet (it waits for the link's decision).
    #[error("not streaming yet")]
    NotStreaming,
    /// The link is down.
    #[error("not connected to the target; try again when status shows it connected")]
    NotConnected,
    /// The replica did not acknowledge everything captured before the request in time.
    #[error("the replica did not catch up within 10 minutes")]
    CatchUpTimeout,
    /// The capture thread is gone.
    #[error("the capture thread stopped")]
    CaptureStopped,
    /// The link session ended while listing the replica.
    #[error("stopping")]
    SessionStopped,
    /// The link broke while listing the replica.
    #[error(transparent)]
    Link(#[from] doppel_link::LinkError),
    /// The target refused the job while listing the replica.
    #[error("{0}")]
    Refused(doppel_proto::Refusal),
    /// Carrying out the request failed.
    #[error(transparent)]
    Failed(#[from] AgentError),
}

/// Maps an io error on `path`.
pub fn io_at(path: &std::path::Path) -> impl FnOnce(io::Error) -> AgentError + '_ {
    move |source| AgentError::Io { path: path.to_path_buf(), source }
}
