//! The `watch` capture back-ends.
//!
//! fanotify with a filesystem mark sees every change on the file system with one mark, including
//! directories created later, and reports renames as one event; it needs `CAP_SYS_ADMIN` and a
//! kernel with `FAN_REPORT_DFID_NAME` (5.9+) and `FAN_RENAME` (5.17+). inotify needs no privilege
//! but one watch per directory, which it adds as directories appear.

use std::io;
use std::path::Path;

use crate::event::EventSource;

pub mod fanotify;
pub mod inotify;

/// Which back-end to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchBackend {
    /// fanotify if it can be set up, else inotify.
    Auto,
    /// fanotify only (fail if unavailable).
    Fanotify,
    /// inotify only.
    Inotify,
}

/// Starts watching `root` (which must be a directory) with the chosen back-end.
pub fn open_watch(root: &Path, backend: WatchBackend) -> io::Result<Box<dyn EventSource>> {
    match backend {
        WatchBackend::Fanotify => Ok(Box::new(fanotify::FanotifySource::new(root)?)),
        WatchBackend::Inotify => Ok(Box::new(inotify::InotifySource::new(root)?)),
        WatchBackend::Auto => match fanotify::FanotifySource::new(root) {
            Ok(s) => Ok(Box::new(s)),
            Err(e) => {
                tracing::info!(error = %e, "fanotify unavailable, watching with inotify");
                Ok(Box::new(inotify::InotifySource::new(root)?))
            }
        },
    }
}
