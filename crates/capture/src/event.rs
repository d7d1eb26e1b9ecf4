//! Change hints from the watch back-ends.

use std::io;
use std::time::Duration;

use doppel_proto::RelPath;

/// Something changed under the job root. Paths are relative to the root; events for paths
/// outside the root are never delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsEvent {
    /// Contents may have changed (write, truncate, fallocate).
    Modified(RelPath),
    /// A writer closed the file: a good moment to compare it.
    Closed(RelPath),
    /// Attributes changed (mode, owner, times, xattrs, link count).
    Attrib(RelPath),
    /// A name appeared: create, mkdir, symlink, hard link, mknod, or moved in from outside the
    /// root. For a directory, entries created inside it before the back-end started watching it
    /// may have no events of their own: consumers scan a new directory.
    Created {
        /// The new name.
        path: RelPath,
        /// Whether it is a directory.
        is_dir: bool,
    },
    /// A name disappeared: unlink, rmdir, or moved out of the root.
    Removed {
        /// The name that went away.
        path: RelPath,
        /// Whether it was a directory.
        is_dir: bool,
    },
    /// A name moved within the root (a directory moves with its whole subtree).
    Renamed {
        /// Old name.
        from: RelPath,
        /// New name.
        to: RelPath,
        /// Whether it is a directory.
        is_dir: bool,
    },
    /// Events were lost (kernel queue overflow, or a back-end could not resolve an event): the
    /// subtree at this path (the root for a full overflow) must be rescanned.
    Rescan(RelPath),
}

/// A source of [`FsEvent`]s for one job root.
pub trait EventSource: Send {
    /// Waits up to `timeout` for events and appends them to `out` in the order the kernel
    /// reported them. Returns with `out` unchanged on timeout. Errors are fatal for the source.
    fn read(&mut self, out: &mut Vec<FsEvent>, timeout: Duration) -> io::Result<()>;

    /// Which back-end this is (`fanotify` or `inotify`), for status and logs.
    fn backend(&self) -> &'static str;
}
