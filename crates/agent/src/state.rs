//! What the agent remembers about a job between runs (`HOME/jobs/JOB/state.json`).

use std::fs;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{AgentError, io_at};

/// Persistent job state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState {
    /// The replica the index describes; set only once a mirror against it completed.
    pub replica_id: Option<[u8; 16]>,
    /// The replica's epoch when last seen.
    pub epoch: u64,
    /// The destination the replica is at (a different destination means a different replica).
    pub dest: String,
    /// The previous run ended cleanly: spool and index were saved together and describe
    /// exactly the same ops. Cleared at start.
    pub clean: bool,
    /// A bandwidth limit set with `doppel limit`, in place of the schedule (bytes per second,
    /// 0: unlimited).
    #[serde(default)]
    pub rate_override: Option<u64>,
    /// The target refused this job as fenced (its workload failed over to the replica, whose
    /// epoch this is): kept so that `doppel status` says so after the agent stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced: Option<u64>,
    /// Bookmark names put into this job's op stream (names are unique per job).
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub bookmarks: std::collections::BTreeSet<String>,
    /// The replica a whole-tree comparison is running against (not saved: after a restart the
    /// comparison starts over).
    #[serde(skip)]
    pub mirroring: Option<[u8; 16]>,
}

impl JobState {
    /// Loads the state, or the default if there is none.
    pub fn load(path: &Path) -> Result<JobState, AgentError> {
        match fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| AgentError::Config(format!("{}: unreadable job state: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(JobState::default()),
            Err(e) => Err(io_at(path)(e)),
        }
    }

    /// Saves atomically and durably.
    pub fn save(&self, path: &Path) -> Result<(), AgentError> {
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec_pretty(self).expect("state serializes");
        (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            fs::rename(&tmp, path)
        })()
        .map_err(io_at(path))
    }
}
