//! Exclusive advisory locks (`flock`) held for as long as a process runs: one agent per job,
//! one job per local replica, one target per data directory. The kernel drops them when the
//! process dies, however it dies, so a killed process never leaves a stale lock behind.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{FlockOperation, Mode, OFlags};

/// Takes an exclusive lock on `path` without waiting: a directory is locked itself, anything
/// else is a lock file, made if missing. `None` when another open file holds it (in this
/// process or another). The lock lasts as long as the returned descriptor.
pub fn lock_exclusive(path: &Path) -> io::Result<Option<OwnedFd>> {
    let file = OFlags::CREATE | OFlags::RDWR | OFlags::CLOEXEC;
    let fd = match rustix::fs::open(path, file, Mode::from_raw_mode(0o600)) {
        Err(rustix::io::Errno::ISDIR) => {
            rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?
        }
        r => r?,
    };
    match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(fd)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_is_held_once_until_its_descriptor_goes_for_files_and_directories() {
        let d = tempfile::tempdir().unwrap();
        for path in [d.path().join("lock"), d.path().to_path_buf()] {
            let held = lock_exclusive(&path).unwrap().expect("free at first");
            assert!(lock_exclusive(&path).unwrap().is_none(), "{} locked twice", path.display());
            drop(held);
            assert!(lock_exclusive(&path).unwrap().is_some(), "{} not freed", path.display());
        }
        assert!(d.path().join("lock").is_file());
    }
}
