//! The replica's persistent state.
//!
//! Two files under the replica's state directory (never inside the replica tree):
//!
//! - `checkpoint.json`, rewritten atomically (temporary file, fsync, rename, directory fsync)
//!   at each commit: the replica's id and epoch, the sequence up to which everything is durable,
//!   and whether ops may have been applied since (`dirty`). `dirty` is made durable before the
//!   first op after a commit touches the replica, so after a power cut the target knows whether
//!   its replica may hold a partial, unordered mix of un-synced changes.
//! - `progress`: the boot id and the last applied sequence, overwritten in place after every op
//!   without fsync. A killed process leaves it exact in the page cache, which is what lets a
//!   restarted target resume at the exact op; after a reboot it is ignored.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ApplyError;

/// What `checkpoint.json` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Random identity of this replica's content lineage.
    pub replica_id: [u8; 16],
    /// Failover epoch.
    pub epoch: u64,
    /// Everything up to here is durable.
    pub applied: u64,
    /// Ops may have been applied after `applied` (not yet durable).
    pub dirty: bool,
    /// The workload failed over to this replica: its source may not write to it until a
    /// failback hands the job back.
    #[serde(default)]
    pub failed_over: bool,
}

fn state_err(path: &Path) -> impl FnOnce(io::Error) -> ApplyError + '_ {
    move |source| ApplyError::State { path: path.to_path_buf(), source }
}

/// Reads the checkpoint, if there is one.
pub fn read_checkpoint(dir: &Path) -> Result<Option<Checkpoint>, ApplyError> {
    let path = dir.join("checkpoint.json");
    match fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| state_err(&path)(io::Error::new(io::ErrorKind::InvalidData, e))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(state_err(&path)(e)),
    }
}

/// Writes the checkpoint durably.
pub fn write_checkpoint(dir: &Path, c: &Checkpoint) -> Result<(), ApplyError> {
    let path = dir.join("checkpoint.json");
    let tmp = dir.join("checkpoint.json.tmp");
    let body = serde_json::to_vec_pretty(c).expect("a checkpoint serializes");
    (|| -> io::Result<()> {
        let f = File::create(&tmp)?;
        f.write_all_at(&body, 0)?;
        // The data and the size: all a new file needs before the rename.
        f.sync_data()?;
        fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    })()
    .map_err(state_err(&path))
}

/// The per-op progress marker.
pub struct Progress {
    file: File,
    path: PathBuf,
    boot: [u8; 36],
}

const PROGRESS_LEN: usize = 36 + 8;

/// This boot's id (`/proc/sys/kernel/random/boot_id`): tells a process restart from a reboot.
pub fn boot_id() -> [u8; 36] {
    let mut out = [b'0'; 36];
    if let Ok(s) = fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let s = s.trim().as_bytes();
        let n = s.len().min(36);
        out[..n].copy_from_slice(&s[..n]);
    }
    out
}

impl Progress {
    /// Opens the progress file, returning it and the sequence it records if it was written
    /// during this boot.
    pub fn open(dir: &Path) -> Result<(Progress, Option<u64>), ApplyError> {
        let path = dir.join("progress");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(state_err(&path))?;
        let boot = boot_id();
        let mut buf = [0u8; PROGRESS_LEN];
        let seen = match file.read_exact_at(&mut buf, 0) {
            Ok(()) if buf[..36] == boot => Some(u64::from_le_bytes(buf[36..].try_into().expect("8 bytes"))),
            _ => None,
        };
        Ok((Progress { file, path, boot }, seen))
    }

    /// Records that every op up to `seq` has been applied.
    pub fn record(&self, seq: u64) -> Result<(), ApplyError> {
        let mut buf = [0u8; PROGRESS_LEN];
        buf[..36].copy_from_slice(&self.boot);
        buf[36..].copy_from_slice(&seq.to_le_bytes());
        self.file.write_all_at(&buf, 0).map_err(state_err(&self.path))
    }
}

/// A fresh random replica id.
pub fn new_replica_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).expect("the OS random source is available");
    id
}
