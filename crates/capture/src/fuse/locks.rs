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
//! Data ops on different files run in parallel; ops on one file, and name changes, are
//! serialized. The mirror (a difference mirror or verify repair running while applications
//! write) takes the same locks around each name it compares and each block it reads, which is
//! what keeps its reads from tearing against concurrent writes.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::{ArcMutexGuard, Mutex, RawMutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The lock of one file (shared by every node and every mirror pass that touch it).
pub type FileLock = Arc<Mutex<()>>;

/// A held file lock.
pub type FileGuard = ArcMutexGuard<RawMutex, ()>;

/// A file's identity: device and inode.
type FileKey = (u64, u64);

/// All the locks of one mount.
#[derive(Default)]
pub struct Locks {
    namespace: RwLock<()>,
    files: Mutex<HashMap<FileKey, Weak<Mutex<()>>>>,
}

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
        if let Some(l) = files.get(&key).and_then(Weak::upgrade) {
            return l;
        }
        if files.len() > 4096 {
            files.retain(|_, w| w.strong_count() > 0);
        }
        let l = Arc::new(Mutex::new(()));
        files.insert(key, Arc::downgrade(&l));
        l
    }

    /// Locks the file with identity `key`.
    pub fn lock_file(&self, key: (u64, u64)) -> FileGuard {
        self.file(key).lock_arc()
    }
}
