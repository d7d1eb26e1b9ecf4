//! The inotify back-end: one watch per directory, added as directories appear.
//!
//! inotify needs no privilege, but it only reports names relative to a watched directory, so
//! this module keeps a map from watch descriptor to the directory's [`RelPath`], rewrites it when
//! directories are renamed, pairs `IN_MOVED_FROM`/`IN_MOVED_TO` into one rename, and adds watches
//! to new directories (and to any sub-directories that appeared before the watch did).
//!
//! Known limits, all rare races that the consumer's scans absorb: a directory created and then
//! moved by a renamed parent before its event is read may stay unwatched until the next rescan.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use doppel_proto::RelPath;
use inotify::{Event, EventMask, Inotify, WatchDescriptor, WatchMask, Watches};

use crate::event::{EventSource, FsEvent};

/// Kernel reads go through this buffer; 64 KiB holds hundreds of events per system call.
const BUF_SIZE: usize = 64 * 1024;
/// How long to wait for the `IN_MOVED_TO` half of a rename before calling it a move out.
const PAIR_WAIT: Duration = Duration::from_millis(20);
/// How many extra short waits one `read` may spend pairing renames, so that a busy tree cannot
/// keep it from returning.
const PAIR_ROUNDS: usize = 4;

fn watch_mask() -> WatchMask {
    WatchMask::MODIFY
        | WatchMask::ATTRIB
        | WatchMask::CLOSE_WRITE
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::DONT_FOLLOW
        | WatchMask::EXCL_UNLINK
        | WatchMask::ONLYDIR
}

/// Watches a job root with inotify, for when fanotify is unavailable (no `CAP_SYS_ADMIN` or an
/// old kernel). Costs one kernel watch per directory (`fs.inotify.max_user_watches`).
pub struct InotifySource {
    inotify: Inotify,
    buf: Vec<u8>,
    tree: Tree,
}

/// The watched directories; separate from the read buffer so events can borrow the buffer while
/// the tree is updated.
struct Tree {
    root: PathBuf,
    watches: Watches,
    dirs: HashMap<WatchDescriptor, RelPath>,
}

/// An `IN_MOVED_FROM` waiting for its `IN_MOVED_TO`. `out[idx]` already holds the `Removed` it
/// becomes if no partner comes, and is overwritten with a `Renamed` if one does.
struct Pending {
    cookie: u32,
    idx: usize,
    from: RelPath,
    is_dir: bool,
}

impl InotifySource {
    /// Watches every directory under `root` (a directory; symlinks below it are not followed).
    /// Fails if the root cannot be watched or the watch limit is reached, naming the sysctl to
    /// raise, because a partly watched tree would miss changes silently.
    pub fn new(root: &Path) -> io::Result<Self> {
        let inotify = Inotify::init().map_err(|e| match e.raw_os_error() {
            Some(libc::EMFILE) => io::Error::new(
                e.kind(),
                format!(
                    "inotify instance limit reached ({e}): raise the sysctl fs.inotify.max_user_instances"
                ),
            ),
            _ => e,
        })?;
        let root = fs::canonicalize(root)?;
        let mut tree = Tree { root, watches: inotify.watches(), dirs: HashMap::new() };
        tree.add_tree(RelPath::root())?;
        Ok(InotifySource { inotify, buf: vec![0; BUF_SIZE], tree })
    }

    /// Waits up to `timeout` for the inotify fd to become readable; `false` on timeout or signal.
    fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd { fd: self.inotify.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `pfd` is a valid, initialized pollfd that outlives the call, and we pass a count
        // of exactly one.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
        }
        Ok(n > 0)
    }

    /// Reads and translates events until the queue is empty.
    fn drain(&mut self, out: &mut Vec<FsEvent>, start: usize, pending: &mut Vec<Pending>) -> io::Result<()> {
        loop {
            match self.inotify.read_events(&mut self.buf) {
                Ok(events) => {
                    for ev in events {
                        self.tree.handle(ev, out, start, pending)?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl EventSource for InotifySource {
    fn read(&mut self, out: &mut Vec<FsEvent>, timeout: Duration) -> io::Result<()> {
        if !self.wait(timeout)? {
            return Ok(());
        }
        let start = out.len();
        let mut pending = Vec::new();
        let mut rounds = 0;
        loop {
            self.drain(out, start, &mut pending)?;
            // The two halves of a rename are queued back to back, but a read can end between them.
            if pending.is_empty() || rounds == PAIR_ROUNDS || !self.wait(PAIR_WAIT)? {
                break;
            }
            rounds += 1;
        }
        // Unpaired: moved out of the tree. `out` already says Removed; stop watching what left.
        for p in pending.into_iter().filter(|p| p.is_dir) {
            self.tree.unwatch_tree(&p.from);
        }
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "inotify"
    }
}

impl Tree {
    fn abs(&self, rel: &RelPath) -> PathBuf {
        if rel.is_root() { self.root.clone() } else { self.root.join(rel.as_path()) }
    }

    /// Adds (or refreshes) the watch on one directory. `Ok(None)` if it is gone or no longer a
    /// directory (a race with its removal), `Ok(Some(new))` otherwise.
    fn watch_dir(&mut self, rel: &RelPath) -> io::Result<Option<bool>> {
        let abs = self.abs(rel);
        match self.watches.add(&abs, watch_mask()) {
            Ok(wd) => Ok(Some(self.dirs.insert(wd, rel.clone()).is_none())),
            Err(e) => match e.raw_os_error() {
                Some(libc::ENOENT | libc::ENOTDIR) if !rel.is_root() => Ok(None),
                Some(libc::EACCES) if !rel.is_root() => {
                    tracing::warn!(path = %abs.display(), "cannot watch directory: permission denied");
                    Ok(None)
                }
                Some(libc::ENOSPC) => Err(io::Error::new(
                    e.kind(),
                    format!(
                        "inotify watch limit reached at {}: raise the sysctl fs.inotify.max_user_watches",
                        abs.display()
                    ),
                )),
                _ => Err(io::Error::new(e.kind(), format!("cannot watch {}: {e}", abs.display()))),
            },
        }
    }

    /// Watches `top` and every directory below it. Each directory is watched before it is listed,
    /// so a sub-directory made meanwhile is either listed here or reported by the new watch.
    fn add_tree(&mut self, top: RelPath) -> io::Result<()> {
        let mut stack = vec![top];
        while let Some(dir) = stack.pop() {
            if self.watch_dir(&dir)?.is_none() {
                continue;
            }
            let entries = match fs::read_dir(self.abs(&dir)) {
                Ok(entries) => entries,
                Err(e) => {
                    if e.kind() != io::ErrorKind::NotFound {
                        tracing::warn!(path = %dir, error = %e, "cannot list directory");
                    }
                    continue;
                }
            };
            for entry in entries.flatten() {
                // DirEntry::file_type does not follow symlinks.
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                match dir.join(entry.file_name().as_bytes()) {
                    Ok(sub) => stack.push(sub),
                    Err(e) => tracing::warn!(error = %e, "skipping directory with an invalid name"),
                }
            }
        }
        Ok(())
    }

    /// Removes the watches of `top` and everything below it (the subtree left the root).
    fn unwatch_tree(&mut self, top: &RelPath) {
        let gone: Vec<WatchDescriptor> =
            self.dirs.iter().filter(|(_, p)| p.starts_with(top)).map(|(wd, _)| wd.clone()).collect();
        for wd in gone {
            self.dirs.remove(&wd);
            // Fails only if the kernel already dropped it (IN_IGNORED still queued).
            let _ = self.watches.remove(wd);
        }
    }

    /// A directory moved from `from` to `to` within the root: rewrites the stored paths of its
    /// watches, and watches it afresh if it is not the inode we were watching at `from`.
    fn rename_dirs(&mut self, from: &RelPath, to: &RelPath) -> io::Result<()> {
        for path in self.dirs.values_mut() {
            if let Some(new) = path.rebase(from, to) {
                *path = new;
            }
        }
        if self.watch_dir(to)? == Some(true) {
            self.add_tree(to.clone())?;
        }
        Ok(())
    }

    /// Re-watches the whole tree after lost events: adds missing watches, corrects the paths of
    /// existing ones, and drops watches on directories no longer under the root.
    fn rewalk(&mut self) -> io::Result<()> {
        let old = std::mem::take(&mut self.dirs);
        self.add_tree(RelPath::root())?;
        for wd in old.into_keys() {
            if !self.dirs.contains_key(&wd) {
                let _ = self.watches.remove(wd);
            }
        }
        Ok(())
    }

    /// Translates one kernel event, appending to `out` (of which `out[start..]` is this read's).
    fn handle(
        &mut self,
        ev: Event<&OsStr>,
        out: &mut Vec<FsEvent>,
        start: usize,
        pending: &mut Vec<Pending>,
    ) -> io::Result<()> {
        let mask = ev.mask;
        if mask.contains(EventMask::Q_OVERFLOW) {
            tracing::warn!("inotify queue overflowed: rescanning the whole tree");
            out.push(FsEvent::Rescan(RelPath::root()));
            return self.rewalk();
        }
        // Events from watches already dropped (moved out, or after rm) are stale.
        let Some(dir) = self.dirs.get(&ev.wd).cloned() else { return Ok(()) };
        if mask.contains(EventMask::IGNORED) {
            self.dirs.remove(&ev.wd);
            return Ok(());
        }
        let is_dir = mask.contains(EventMask::ISDIR);
        let path = match ev.name {
            None => dir.clone(),
            Some(name) => match dir.join(name.as_bytes()) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "skipping event for an invalid name");
                    return Ok(());
                }
            },
        };
        if ev.name.is_none()
            && mask.intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::UNMOUNT)
        {
            // Below the root the parent's watch reports the same change with a name.
            if dir.is_root() || mask.contains(EventMask::UNMOUNT) {
                tracing::warn!(path = %dir, ?mask, "watched directory went away");
                out.push(FsEvent::Rescan(dir));
            }
            return Ok(());
        }
        let event = if mask.contains(EventMask::MOVED_FROM) {
            pending.push(Pending { cookie: ev.cookie, idx: out.len(), from: path.clone(), is_dir });
            FsEvent::Removed { path, is_dir }
        } else if mask.contains(EventMask::MOVED_TO) {
            let Some(i) = pending.iter().position(|p| p.cookie == ev.cookie) else {
                if is_dir {
                    self.add_tree(path.clone())?;
                }
                out.push(FsEvent::Created { path, is_dir });
                return Ok(());
            };
            let p = pending.remove(i);
            out[p.idx] = FsEvent::Renamed { from: p.from.clone(), to: path.clone(), is_dir };
            if is_dir {
                // Events queued between the halves happened after the move: give them new paths.
                for later in &mut out[p.idx + 1..] {
                    rebase_event(later, &p.from, &path);
                }
                for q in pending.iter_mut() {
                    if let Some(new) = q.from.rebase(&p.from, &path) {
                        q.from = new;
                    }
                }
                self.rename_dirs(&p.from, &path)?;
            }
            return Ok(());
        } else if mask.contains(EventMask::CREATE) {
            if is_dir {
                self.add_tree(path.clone())?;
            }
            FsEvent::Created { path, is_dir }
        } else if mask.contains(EventMask::DELETE) {
            FsEvent::Removed { path, is_dir }
        } else if mask.contains(EventMask::MODIFY) {
            FsEvent::Modified(path)
        } else if mask.contains(EventMask::CLOSE_WRITE) {
            FsEvent::Closed(path)
        } else if mask.contains(EventMask::ATTRIB) {
            FsEvent::Attrib(path)
        } else {
            return Ok(());
        };
        // A change to a watched sub-directory is reported by its parent's watch and its own.
        let dup = matches!(event, FsEvent::Modified(_) | FsEvent::Closed(_) | FsEvent::Attrib(_))
            && out.len() > start
            && out.last() == Some(&event);
        if !dup {
            out.push(event);
        }
        Ok(())
    }
}

/// Rewrites every path in `ev` that lies under `from` to lie under `to`.
fn rebase_event(ev: &mut FsEvent, from: &RelPath, to: &RelPath) {
    let paths = match ev {
        FsEvent::Modified(p) | FsEvent::Closed(p) | FsEvent::Attrib(p) | FsEvent::Rescan(p) => vec![p],
        FsEvent::Created { path, .. } | FsEvent::Removed { path, .. } => vec![path],
        FsEvent::Renamed { from: a, to: b, .. } => vec![a, b],
    };
    for p in paths {
        if let Some(new) = p.rebase(from, to) {
            *p = new;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Instant;

    use super::*;

    fn rel(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    /// Reads until `pred` matches an event in `seen` or 5 s pass; panics with the events seen.
    fn wait_for(
        src: &mut InotifySource,
        seen: &mut Vec<FsEvent>,
        what: &str,
        pred: impl Fn(&FsEvent) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !seen.iter().any(&pred) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}; saw {seen:?}");
            src.read(seen, Duration::from_millis(100)).unwrap();
        }
    }

    fn write(path: &Path, data: &[u8]) {
        File::create(path).unwrap().write_all(data).unwrap();
    }

    fn is_watched(src: &InotifySource, p: &str) -> bool {
        src.tree.dirs.values().any(|d| *d == rel(p))
    }

    #[test]
    fn create_write_close() {
        let dir = tempfile::tempdir().unwrap();
        let mut src = InotifySource::new(dir.path()).unwrap();
        assert_eq!(src.backend(), "inotify");
        write(&dir.path().join("f"), b"hello");
        let mut seen = Vec::new();
        wait_for(&mut src, &mut seen, "Closed(f)", |e| *e == FsEvent::Closed(rel("f")));
        assert!(seen.contains(&FsEvent::Created { path: rel("f"), is_dir: false }), "{seen:?}");
        assert!(seen.contains(&FsEvent::Modified(rel("f"))), "{seen:?}");
    }

    #[test]
    fn chmod_is_attrib_and_dir_attrib_is_not_doubled() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("f"), b"x");
        fs::create_dir(dir.path().join("d")).unwrap();
        let mut src = InotifySource::new(dir.path()).unwrap();
        fs::set_permissions(dir.path().join("f"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(dir.path().join("d"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let mut seen = Vec::new();
        wait_for(&mut src, &mut seen, "Attrib(root)", |e| *e == FsEvent::Attrib(RelPath::root()));
        assert!(seen.contains(&FsEvent::Attrib(rel("f"))), "{seen:?}");
        assert_eq!(seen.iter().filter(|e| **e == FsEvent::Attrib(rel("d"))).count(), 1, "{seen:?}");
    }

    #[test]
    fn file_rename_is_one_event() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("a"), b"x");
        let mut src = InotifySource::new(dir.path()).unwrap();
        fs::rename(dir.path().join("a"), dir.path().join("b")).unwrap();
        let mut seen = Vec::new();
        wait_for(&mut src, &mut seen, "Renamed", |e| matches!(e, FsEvent::Renamed { .. }));
        assert_eq!(seen, vec![FsEvent::Renamed { from: rel("a"), to: rel("b"), is_dir: false }]);
    }

    #[test]
    fn mkdir_p_race_gets_watched() {
        let dir = tempfile::tempdir().unwrap();
        let mut src = InotifySource::new(dir.path()).unwrap();
        fs::create_dir_all(dir.path().join("a/b/c")).unwrap();
        write(&dir.path().join("a/b/c/early"), b"x");
        let mut seen = Vec::new();
        wait_for(&mut src, &mut seen, "Created(a)", |e| {
            *e == FsEvent::Created { path: rel("a"), is_dir: true }
        });
        // Whether or not `early` was seen, c is watched now, so a later write there is.
        assert!(is_watched(&src, "a/b/c"));
        write(&dir.path().join("a/b/c/late"), b"y");
        wait_for(&mut src, &mut seen, "Closed(a/b/c/late)", |e| *e == FsEvent::Closed(rel("a/b/c/late")));
    }

    #[test]
    fn dir_rename_updates_paths() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("d/s")).unwrap();
        let mut src = InotifySource::new(dir.path()).unwrap();
        fs::rename(dir.path().join("d"), dir.path().join("e")).unwrap();
        let mut seen = Vec::new();
        let renamed = FsEvent::Renamed { from: rel("d"), to: rel("e"), is_dir: true };
        wait_for(&mut src, &mut seen, "Renamed(d, e)", |e| *e == renamed);
        assert!(is_watched(&src, "e") && is_watched(&src, "e/s") && !is_watched(&src, "d/s"));
        write(&dir.path().join("e/s/f"), b"x");
        wait_for(&mut src, &mut seen, "Closed(e/s/f)", |e| *e == FsEvent::Closed(rel("e/s/f")));
        assert!(
            !seen
                .iter()
                .any(|e| matches!(e, FsEvent::Removed { .. } | FsEvent::Created { is_dir: true, .. }))
        );
    }

    #[test]
    fn delete_file_and_dir() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("f"), b"x");
        fs::create_dir(dir.path().join("d")).unwrap();
        let mut src = InotifySource::new(dir.path()).unwrap();
        fs::remove_file(dir.path().join("f")).unwrap();
        fs::remove_dir(dir.path().join("d")).unwrap();
        let mut seen = Vec::new();
        let gone_d = FsEvent::Removed { path: rel("d"), is_dir: true };
        wait_for(&mut src, &mut seen, "Removed(d)", |e| *e == gone_d);
        assert!(seen.contains(&FsEvent::Removed { path: rel("f"), is_dir: false }), "{seen:?}");
        // The IN_IGNORED for d's own watch may come in a later read.
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_watched(&src, "d") {
            assert!(Instant::now() < deadline, "watch on d not dropped");
            src.read(&mut seen, Duration::from_millis(100)).unwrap();
        }
    }

    #[test]
    fn move_in_and_out_of_root() {
        let parent = tempfile::tempdir().unwrap();
        let (root, outside) = (parent.path().join("root"), parent.path().join("outside"));
        fs::create_dir_all(root.join("od/sub")).unwrap();
        fs::create_dir(&outside).unwrap();
        write(&outside.join("x"), b"x");
        let mut src = InotifySource::new(&root).unwrap();
        let mut seen = Vec::new();

        fs::rename(outside.join("x"), root.join("x")).unwrap();
        wait_for(&mut src, &mut seen, "Created(x)", |e| {
            *e == FsEvent::Created { path: rel("x"), is_dir: false }
        });
        fs::rename(root.join("x"), outside.join("y")).unwrap();
        wait_for(&mut src, &mut seen, "Removed(x)", |e| {
            *e == FsEvent::Removed { path: rel("x"), is_dir: false }
        });

        fs::rename(root.join("od"), outside.join("od")).unwrap();
        wait_for(&mut src, &mut seen, "Removed(od)", |e| {
            *e == FsEvent::Removed { path: rel("od"), is_dir: true }
        });
        assert!(!is_watched(&src, "od") && !is_watched(&src, "od/sub"), "moved-out dirs still watched");
        assert!(!seen.iter().any(|e| matches!(e, FsEvent::Renamed { .. })), "{seen:?}");
    }

    #[test]
    fn moved_in_tree_is_watched() {
        let parent = tempfile::tempdir().unwrap();
        let (root, outside) = (parent.path().join("root"), parent.path().join("outside"));
        fs::create_dir(&root).unwrap();
        fs::create_dir_all(outside.join("t/u/v")).unwrap();
        let mut src = InotifySource::new(&root).unwrap();
        fs::rename(outside.join("t"), root.join("t")).unwrap();
        let mut seen = Vec::new();
        wait_for(&mut src, &mut seen, "Created(t)", |e| {
            *e == FsEvent::Created { path: rel("t"), is_dir: true }
        });
        write(&root.join("t/u/v/f"), b"x");
        wait_for(&mut src, &mut seen, "Closed(t/u/v/f)", |e| *e == FsEvent::Closed(rel("t/u/v/f")));
    }

    #[test]
    fn dir_created_then_renamed_before_read_is_watched() {
        let dir = tempfile::tempdir().unwrap();
        let mut src = InotifySource::new(dir.path()).unwrap();
        fs::create_dir_all(dir.path().join("x/sub")).unwrap();
        fs::rename(dir.path().join("x"), dir.path().join("y")).unwrap();
        let mut seen = Vec::new();
        let renamed = FsEvent::Renamed { from: rel("x"), to: rel("y"), is_dir: true };
        wait_for(&mut src, &mut seen, "Renamed(x, y)", |e| *e == renamed);
        write(&dir.path().join("y/sub/f"), b"x");
        wait_for(&mut src, &mut seen, "Closed(y/sub/f)", |e| *e == FsEvent::Closed(rel("y/sub/f")));
    }

    #[test]
    fn rewalk_fixes_paths_and_drops_departed_watches() {
        let parent = tempfile::tempdir().unwrap();
        let root = parent.path().join("root");
        fs::create_dir_all(root.join("d/s")).unwrap();
        fs::create_dir_all(root.join("gone")).unwrap();
        let mut src = InotifySource::new(&root).unwrap();
        fs::rename(root.join("d"), root.join("e")).unwrap();
        fs::rename(root.join("gone"), parent.path().join("gone")).unwrap();
        fs::create_dir(root.join("new")).unwrap();
        src.tree.rewalk().unwrap();
        let mut dirs: Vec<String> = src.tree.dirs.values().map(|p| p.to_string()).collect();
        dirs.sort();
        assert_eq!(dirs, [".", "e", "e/s", "new"]);
    }

    #[test]
    fn rebase_event_rewrites_paths_under_the_old_name() {
        let mut ev = FsEvent::Renamed { from: rel("d/a"), to: rel("x/b"), is_dir: false };
        rebase_event(&mut ev, &rel("d"), &rel("e"));
        assert_eq!(ev, FsEvent::Renamed { from: rel("e/a"), to: rel("x/b"), is_dir: false });
    }
}
