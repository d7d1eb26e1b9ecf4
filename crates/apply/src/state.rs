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
//!   restarted target resume at the exact op; after a reboot it is ignored. Behind them, the
//!   last [`ExchangeNote`] (written before each rename-exchange, see
//!   [`crate::ops::ExchangeNotes`]); a file without one (written by an older version) has no
//!   note, which is all it means.

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
    note: Option<ExchangeNote>,
}

/// Boot id and sequence.
const PROGRESS_LEN: usize = 36 + 8;
/// An exchange note after them: sequence, device, inode.
const NOTE_LEN: usize = 3 * 8;

/// Which object a rename-exchange found at its `from` name just before it swapped the two
/// names. A swap leaves both names in place, so only this tells a replay of the exchange (the
/// object is now at `to`: done) from a first attempt (it is still at `from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExchangeNote {
    /// The exchange op's sequence.
    pub seq: u64,
    /// Device of the object that was at `from`.
    pub dev: u64,
    /// Inode of the object that was at `from`.
    pub ino: u64,
}

impl ExchangeNote {
    fn encode(&self) -> [u8; NOTE_LEN] {
        let mut b = [0u8; NOTE_LEN];
        for (chunk, v) in b.chunks_exact_mut(8).zip([self.seq, self.dev, self.ino]) {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    fn decode(b: &[u8; NOTE_LEN]) -> ExchangeNote {
        let v = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        ExchangeNote { seq: v(0), dev: v(1), ino: v(2) }
    }
}

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
        if seen.is_none() {
            // A note from another boot is meaningless: drop it with the old sequence.
            file.set_len(PROGRESS_LEN as u64).map_err(state_err(&path))?;
        }
        let mut note = [0u8; NOTE_LEN];
        let note = (seen.is_some() && file.read_exact_at(&mut note, PROGRESS_LEN as u64).is_ok())
            .then(|| ExchangeNote::decode(&note));
        Ok((Progress { file, path, boot, note }, seen))
    }

    /// The exchange note left for `seq` during this boot, if any.
    pub fn exchange_note(&self, seq: u64) -> Option<ExchangeNote> {
        self.note.filter(|n| n.seq == seq)
    }

    /// Records `note` before its exchange is carried out (in the page cache, like the
    /// sequence: it has to survive a killed process, not a reboot).
    pub fn note_exchange(&mut self, note: ExchangeNote) -> Result<(), ApplyError> {
        self.file.write_all_at(&note.encode(), PROGRESS_LEN as u64).map_err(state_err(&self.path))?;
        self.note = Some(note);
        Ok(())
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
