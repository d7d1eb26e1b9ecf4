//! The locks that make op order equal effect order.
//!
//! Two ops on the same file must be sequenced in the order their effects landed on the
//! underlying file, or overlapping writes would replay differently on the replica. And an op
//! that carries a path must be sequenced consistently with the ops that change names, or a
//! write could be replayed into a file that a rename already moved away. So:
//!
//! - every op that changes names (create, unlink, rename...) holds the namespace lock
//!   *exclusively* across the system call and the sequencing of its op;
//! - every data op (write, truncate, attribute change) holds it *shared*, plus the lock of
//!   its file, across the system call and the sequencing of its op.
//!
//! Data ops on different files run in parallel; name changes are serialized. On one file,
//! writes to ranges that do not overlap run in parallel too (a VM's disk image gets many
//! at once, and they commute: either order leaves the same bytes, and the kernel had them in
//! flight together, so either is an order the application allowed); overlapping writes wait
//! for each other, and every other op on the file (truncate, attributes, fallocate, the
//! mirror's reads) takes the whole file. The mirror (a difference mirror or verify repair running while applications
//! write) takes the same locks around each name it compares and each block it reads, which is
//! what keeps its reads from tearing against concurrent writes.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::lock_api::RawRwLock as _;
use parking_lot::{Condvar, Mutex, RawRwLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The lock of one file (shared by every node and every mirror pass that touch it).
pub type FileLock = Arc<FileState>;

/// One file's lock: taken whole, or shared by writes to ranges that do not overlap.
pub struct FileState {
    whole: RawRwLock,
    /// The ranges (start, end) being written under the shared lock.
    ranges: Mutex<Vec<(u64, u64)>>,
    freed: Condvar,
}

impl Default for FileState {
    fn default() -> FileState {
        FileState { whole: RawRwLock::INIT, ranges: Mutex::new(Vec::new()), freed: Condvar::new() }
    }
}

impl FileState {
    /// The whole file, exclusively.
    pub fn lock(self: &Arc<Self>) -> FileGuard {
        self.whole.lock_exclusive();
        FileGuard(self.clone())
    }

    /// `[offset, offset + len)`: shared with writes to other ranges, exclusive of overlapping
    /// ones and of whole-file holders.
    pub fn lock_range(self: &Arc<Self>, offset: u64, len: u64) -> RangeGuard {
        self.whole.lock_shared();
        let range = (offset, offset.saturating_add(len));
        let mut ranges = self.ranges.lock();
        while ranges.iter().any(|&(a, b)| a < range.1 && range.0 < b) {
            self.freed.wait(&mut ranges);
        }
        ranges.push(range);
        RangeGuard { file: self.clone(), range }
    }
}

/// A file held whole.
pub struct FileGuard(Arc<FileState>);

impl Drop for FileGuard {
    fn drop(&mut self) {
        // SAFETY: taken exclusively by `FileState::lock`, released once, here.
        unsafe { self.0.whole.unlock_exclusive() }
    }
}

/// A file held for a write: the range it writes, or the whole file.
pub enum WriteGuard {
    /// The range written.
    Range(RangeGuard),
    /// The whole file (a write that drops privileges changes the file's attributes too).
    Whole(FileGuard),
}

/// A range of a file held for a write.
pub struct RangeGuard {
    file: Arc<FileState>,
    range: (u64, u64),
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let mut ranges = self.file.ranges.lock();
        if let Some(i) = ranges.iter().position(|&r| r == self.range) {
            ranges.swap_remove(i);
        }
        drop(ranges);
        self.file.freed.notify_all();
        // SAFETY: taken shared by `FileState::lock_range`, released once, here.
        unsafe { self.file.whole.unlock_shared() }
    }
}

/// A file's identity: device and inode.
type FileKey = (u64, u64);

/// All the locks of one mount.
#[derive(Default)]
pub struct Locks {
    namespace: RwLock<()>,
    files: Mutex<FileTable>,
}

/// The lock of every file something holds, by identity. Locks nobody holds any more are
/// swept when the table has doubled since the last sweep: a sweep at every insertion past a
/// fixed size cost a walk of the whole table per new file once more files than that were
/// open (the kernel keeps the inodes of a mount's recent files, and their nodes hold their
/// locks), 8 % of the daemon's time in a run of creates.
#[derive(Default)]
struct FileTable {
    map: HashMap<FileKey, Weak<FileState>>,
    sweep_at: usize,
}

/// The smallest table that is swept.
const SWEEP_MIN: usize = 4096;

impl Locks {
    /// Held exclusively by ops that change names.
    pub fn names(&self) -> RwLockWriteGuard<'_, ()> {
        self.namespace.write()
    }

    /// Held shared by data ops and by the mirror while it compares one name.
    pub fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.namespace.read()
    }

    /// Held shared by the mirror, which may take it again while holding it (a plain shared
    /// lock could deadlock behind a waiting writer).
    pub fn shared_recursive(&self) -> RwLockReadGuard<'_, ()> {
        self.namespace.read_recursive()
    }

    /// The lock of the file with identity `key` (device, inode).
    pub fn file(&self, key: (u64, u64)) -> FileLock {
        let mut files = self.files.lock();
        if let Some(l) = files.map.get(&key).and_then(Weak::upgrade) {
            return l;
        }
        if files.map.len() >= files.sweep_at.max(SWEEP_MIN) {
            files.map.retain(|_, w| w.strong_count() > 0);
            files.sweep_at = files.map.len() * 2;
        }
        let l = Arc::new(FileState::default());
        files.map.insert(key, Arc::downgrade(&l));
        l
    }

    /// Locks the file with identity `key`.
    pub fn lock_file(&self, key: (u64, u64)) -> FileGuard {
        self.file(key).lock()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::FileState;

    /// Long enough for a thread to finish on a loaded machine.
    const FINISHES: Duration = Duration::from_secs(10);
    /// How long a blocked thread is watched not finishing.
    const BLOCKED: Duration = Duration::from_millis(200);

    /// Runs `f` on a thread and tells whether it finished within `within` (it is blocked if
    /// not; the thread is left to finish once the lock it waits for is released).
    fn finishes(within: Duration, f: impl FnOnce() + Send + 'static) -> (bool, std::thread::JoinHandle<()>) {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let h = std::thread::spawn(move || {
            f();
            d.store(true, Ordering::SeqCst);
        });
        let deadline = std::time::Instant::now() + within;
        while !done.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        (done.load(Ordering::SeqCst), h)
    }

    #[test]
    fn a_held_lock_is_handed_out_again_and_the_table_forgets_unheld_ones_in_bounded_space() {
        let locks = super::Locks::default();
        let held: Vec<_> = (0..6000u64).map(|i| locks.file((1, i))).collect();
        for i in 0..50_000u64 {
            drop(locks.file((2, i)));
            let len = locks.files.lock().map.len();
            assert!(len <= 2 * held.len() + super::SWEEP_MIN, "{len} entries for {} held locks", held.len());
        }
        for (i, l) in held.iter().enumerate() {
            assert!(Arc::ptr_eq(l, &locks.file((1, i as u64))), "file {i} got a second lock");
        }
    }

    #[test]
    fn writes_to_separate_ranges_share_the_file_and_overlapping_ones_wait() {
        let file = Arc::new(FileState::default());
        let held = file.lock_range(0, 4096);
        let f = file.clone();
        let (apart, h) = finishes(FINISHES, move || drop(f.lock_range(4096, 4096)));
        assert!(apart, "a write to the next range waited");
        h.join().unwrap();
        let f = file.clone();
        let (overlapping, h) = finishes(BLOCKED, move || drop(f.lock_range(4095, 2)));
        assert!(!overlapping, "an overlapping write did not wait");
        drop(held);
        h.join().unwrap();
    }

    #[test]
    fn the_whole_file_excludes_every_range_and_waits_for_them() {
        let file = Arc::new(FileState::default());
        let held = file.lock_range(1 << 20, 10);
        let f = file.clone();
        let (whole, h) = finishes(BLOCKED, move || drop(f.lock()));
        assert!(!whole, "the whole file was taken while a range was written");
        drop(held);
        h.join().unwrap();
        let whole = file.lock();
        let f = file.clone();
        let (range, h) = finishes(BLOCKED, move || drop(f.lock_range(0, 1)));
        assert!(!range, "a range was taken while the whole file was held");
        drop(whole);
        h.join().unwrap();
    }
}
