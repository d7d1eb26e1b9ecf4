//! Taking a job back after a failback.
//!
//! During a failback the DR side streams its replica back into the source's tree; the last
//! message hands the job over: the tree now equals the replica, which continues at a new
//! epoch after a given sequence. [`adopt_replica`] records exactly that as the job's saved
//! state, as if a clean stop had just happened, so that the next [`crate::Agent`] resumes
//! without comparing anything.

use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use doppel_fs::Selection;
use doppel_spool::Spool;

use crate::agent::job_dir;
use crate::config::JobConfig;
use crate::error::{AgentError, io_at};
use crate::state::JobState;

/// The exclusive lock of a job's state: held by a running agent, or by a failback receiving
/// the job's tree, so the two can never run at once.
pub struct JobLock {
    _fd: OwnedFd,
    /// The job's state directory.
    pub dir: PathBuf,
}

/// Takes the lock of `job` under `home` (an error names the process-independent lock file if
/// another process holds it).
pub fn lock_job(home: &Path, job: &str) -> Result<JobLock, AgentError> {
    let dir = job_dir(home, job);
    fs::create_dir_all(&dir).map_err(io_at(&dir))?;
    let fd = crate::agent::take_lock(&dir, job)?;
    Ok(JobLock { _fd: fd, dir })
}

/// Where a handed-over job continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adopted {
    /// The replica the job protects to again.
    pub replica_id: [u8; 16],
    /// Its new epoch.
    pub epoch: u64,
    /// The replica's applied sequence; the job's next op follows it.
    pub applied_seq: u64,
}

/// Records that `job`'s tree now equals the replica described by `a`: a fresh index of the
/// tree, an empty spool numbered after `a.applied_seq`, no dirty regions, and a clean state.
/// Whatever the job's old spool held (ops from before the failover) is discarded: the
/// replica's history won.
pub fn adopt_replica(job: &JobConfig, lock: &JobLock, a: Adopted) -> Result<(), AgentError> {
    let dir = &lock.dir;
    let root = fs::canonicalize(&job.root).map_err(io_at(&job.root))?;
    let selection =
        Selection::new(&job.include, &job.exclude).map_err(|e| AgentError::Config(e.to_string()))?;
    let saved_at = doppel_link::framed::now_us();
    let (mut index, _) = crate::agent::open_index(&dir.join(crate::agent::INDEX_FILE), job.index_cache)?;
    crate::capture_loop::stat_index(&mut index, &root, &selection)?;
    let (spool, _) = Spool::open(&dir.join("spool"), job.spool)?;
    spool.reset(a.applied_seq)?;
    spool.close();
    index.save(saved_at, a.applied_seq)?;
    for stale in ["activity.log", "dirty.log"] {
        match fs::remove_file(dir.join(stale)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at(&dir.join(stale))(e)),
        }
    }
    let state_path = dir.join("state.json");
    let old = JobState::load(&state_path)?;
    let state = JobState {
        replica_id: Some(a.replica_id),
        epoch: a.epoch,
        dest: job.dest.to_string(),
        clean: true,
        rate_override: old.rate_override,
        fenced: None,
        bookmarks: old.bookmarks,
        mirroring: None,
    };
    state.save(&state_path)
}
