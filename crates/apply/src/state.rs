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
    /// The marker's page, mapped once this process has written its boot id there: later
    /// sequences are single stores into the page cache instead of a `pwrite` each (a tenth of
    /// the apply thread's time with small files, with a file-system watch on the same file
    /// system: every write is an event).
    seq: Option<SeqPage>,
}

/// The progress file's first page, shared, for storing the sequence at [`SEQ_AT`].
///
/// A store is one instruction: a killed process leaves either the old or the new sequence in
/// the page cache, never a mix, exactly as a `pwrite` of eight bytes did. (A reboot loses the
/// page either way; the boot id tells.)
struct SeqPage {
    ptr: std::ptr::NonNull<u8>,
}

// SAFETY: the page is only written through `&mut Progress` (one thread at a time), and the
// mapping stays valid wherever the owner moves.
unsafe impl Send for SeqPage {}
unsafe impl Sync for SeqPage {}

/// Where the sequence sits in the progress file (after the boot id).
const SEQ_AT: usize = 36;

impl SeqPage {
    fn map(file: &File) -> io::Result<SeqPage> {
        if file.metadata()?.len() < PROGRESS_LEN as u64 {
            return Err(io::Error::other("progress file shorter than its marker"));
        }
        // SAFETY: a new shared mapping of bytes the file has (checked above: touching them
        // cannot fault); only this process's `Progress` changes the file's length, and never
        // below the marker while the mapping lives.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                PROGRESS_LEN,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                file,
                0,
            )?
        };
        let ptr =
            std::ptr::NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(SeqPage { ptr })
    }

    fn store(&mut self, seq: u64) {
        // SAFETY: SEQ_AT + 8 <= PROGRESS_LEN, inside the mapping; volatile so the store is made
        // here and now, not folded into a later one.
        unsafe { self.ptr.as_ptr().add(SEQ_AT).cast::<[u8; 8]>().write_volatile(seq.to_le_bytes()) }
    }
}

impl Drop for SeqPage {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), PROGRESS_LEN) };
    }
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
        Ok((Progress { file, path, boot, note, seq: None }, seen))
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
    pub fn record(&mut self, seq: u64) -> Result<(), ApplyError> {
        if let Some(page) = &mut self.seq {
            page.store(seq);
            return Ok(());
        }
        let mut buf = [0u8; PROGRESS_LEN];
        buf[..SEQ_AT].copy_from_slice(&self.boot);
        buf[SEQ_AT..].copy_from_slice(&seq.to_le_bytes());
        self.file.write_all_at(&buf, 0).map_err(state_err(&self.path))?;
        // This boot's id is in place: from now on only the sequence changes. Without a
        // mapping (none to be had) every record stays a `pwrite`.
        self.seq = SeqPage::map(&self.file)
            .inspect_err(|e| tracing::debug!(error = %e, "progress marker not mapped"))
            .ok();
        Ok(())
    }
}

/// A fresh random replica id.
pub fn new_replica_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).expect("the OS random source is available");
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sequences stored through the mapped page are what the file says, to a reader in this
    /// process and to the next `open`, as a `pwrite` left them; the exchange note after them
    /// is kept.
    #[test]
    fn mapped_sequences_read_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let (mut p, seen) = Progress::open(dir.path()).unwrap();
        assert_eq!(seen, None);
        p.record(7).unwrap();
        assert!(p.seq.is_some(), "mapped after the first record");
        p.note_exchange(ExchangeNote { seq: 9, dev: 1, ino: 2 }).unwrap();
        for s in [8, 9, 1 << 40] {
            p.record(s).unwrap();
            let bytes = fs::read(dir.path().join("progress")).unwrap();
            assert_eq!(&bytes[..SEQ_AT], &boot_id()[..]);
            assert_eq!(u64::from_le_bytes(bytes[SEQ_AT..PROGRESS_LEN].try_into().unwrap()), s);
        }
        drop(p);
        let (p, seen) = Progress::open(dir.path()).unwrap();
        assert_eq!(seen, Some(1 << 40));
        assert_eq!(p.exchange_note(9), Some(ExchangeNote { seq: 9, dev: 1, ino: 2 }));
    }
}
