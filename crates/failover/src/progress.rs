//! The record of a failover or failback in progress: which steps are done.
//!
//! Saved (atomically, synced) after every step, so a run that stopped half way, at a failing
//! script or with the target itself killed, goes on where it stopped when it is run again,
//! and never redoes a step that completed: a VM is not started twice, an epoch is not bumped
//! twice.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::manager::FailoverError;
use crate::runner::{ProgressStore, StepKey};

/// One run's progress.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// When the run began (microseconds since the epoch).
    pub started_us: u64,
    /// Why it began (`auto: silent for 31 s`, `manual`).
    pub cause: String,
    /// The jobs it covers.
    pub jobs: BTreeSet<String>,
    /// Keys of the steps done (`fence:www`, `address:10.0.0.5/24`, `failover:www:0`).
    pub done: BTreeSet<StepKey>,
    /// Epochs the run set, per job.
    pub epochs: BTreeMap<String, u64>,
    /// When the run completed, if it did.
    pub finished_us: Option<u64>,
    /// The error that stopped the last attempt.
    pub failed: Option<String>,
    /// The point the replicas go back to (`--at`, as given), if one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

impl Progress {
    /// Loads the record at `path`, if there is one.
    pub fn load(path: &Path) -> io::Result<Option<Progress>> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Saves atomically and durably.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).expect("progress serializes"))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }

    /// Removes the record at `path`.
    pub fn remove(path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// The progress file of one run.
#[derive(Debug, Clone)]
pub struct FileStore(pub PathBuf);

impl ProgressStore for FileStore {
    fn load(&self) -> Result<Option<Progress>, FailoverError> {
        Progress::load(&self.0).map_err(|source| FailoverError::Io { path: self.0.clone(), source })
    }

    fn save(&self, p: &Progress) -> Result<(), FailoverError> {
        p.save(&self.0).map_err(|source| FailoverError::Io { path: self.0.clone(), source })
    }
}

/// Where the records of `source` live: `DATA/failover/SOURCE.json` for failovers and
/// `SOURCE.failback.json` for failbacks.
pub fn paths(data: &Path, source: &str) -> (PathBuf, PathBuf) {
    let dir = data.join("failover");
    (dir.join(format!("{source}.json")), dir.join(format!("{source}.failback.json")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_progress_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = paths(dir.path(), "web1");
        assert_eq!(Progress::load(&path).unwrap(), None);
        let mut p = Progress { started_us: 5, cause: "manual".into(), ..Progress::default() };
        p.done.insert(StepKey::Fence("www".into()));
        p.epochs.insert("www".into(), 3);
        p.save(&path).unwrap();
        assert_eq!(Progress::load(&path).unwrap(), Some(p));
        Progress::remove(&path).unwrap();
        Progress::remove(&path).unwrap();
        assert_eq!(Progress::load(&path).unwrap(), None);
    }

    /// A progress file as earlier versions wrote it reads, and writes back the same.
    #[test]
    fn progress_files_in_the_string_key_format_read_and_write_back_the_same() {
        let today = r#"{
  "started_us": 1764870000000000,
  "cause": "auto: silent for 31.0 s",
  "jobs": [
    "db",
    "www"
  ],
  "done": [
    "address:10.0.0.5/24",
    "address:fd00::5/64",
    "failover:db:0",
    "failover:www:1",
    "fence:db",
    "fence:www",
    "handover:www",
    "pre-failover:0",
    "release:10.0.0.5/24",
    "stop-workload:www:2",
    "unfence:www"
  ],
  "epochs": {
    "db": 4,
    "www": 2
  },
  "finished_us": null,
  "failed": "failover (www): `start-vm` failed (exit status: 1)"
}"#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        std::fs::write(&path, today).unwrap();
        let p = Progress::load(&path).unwrap().unwrap();
        use crate::runner::Stage;
        for k in [
            StepKey::Fence("www".into()),
            StepKey::Address("fd00::5/64".into()),
            StepKey::Script { stage: Stage::PreFailover, job: None, index: 0 },
            StepKey::Script { stage: Stage::Failover, job: Some("www".into()), index: 1 },
            StepKey::Script { stage: Stage::StopWorkload, job: Some("www".into()), index: 2 },
            StepKey::Release("10.0.0.5/24".into()),
            StepKey::Unfence("www".into()),
            StepKey::Handover("www".into()),
        ] {
            assert!(p.done.contains(&k), "{k}");
        }
        assert_eq!(p.done.len(), 11);
        p.save(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), today);
        for bad in ["fence", "fence:", "failover:www:x", "reboot:now", "failover::1"] {
            assert!(bad.parse::<StepKey>().is_err(), "{bad}");
        }
    }
}
