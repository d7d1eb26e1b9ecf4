//! fanotify back-end: one filesystem mark, filtered to the job root.
//!
//! A `FAN_MARK_FILESYSTEM` mark covers directories created later without the mkdir/add-watch race of
//! inotify, and with `FAN_REPORT_DFID_NAME | FAN_REPORT_FID | FAN_REPORT_TARGET_FID` the kernel reports
//! file handles instead of opening an fd per event, and a rename as one `FAN_RENAME` carrying the old
//! and the new parent+name. Directory handles are turned back into paths with `open_by_handle_at` and
//! a readlink of `/proc/self/fd/N` (an unresolvable handle, e.g. ESTALE for a deleted directory,
//! drops the event: its parent's own event reports the deletion). The mark sees the whole file system, so a small cache of directory
//! handle -> path-under-root (or "outside") makes dropping foreign events a hash lookup; directory paths
//! only change through directory renames, and every one of those on the file system reaches us, so
//! the cache is cleared on each of them (and on overflow).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::Path;
use std::time::{Duration, Instant};

use doppel_proto::RelPath;
use libc::{
    FAN_ATTRIB, FAN_CLOSE_WRITE, FAN_CREATE, FAN_DELETE, FAN_MODIFY, FAN_ONDIR, FAN_Q_OVERFLOW, FAN_RENAME,
};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::event::{EventSource, FsEvent};

const INIT_FLAGS: libc::c_uint = libc::FAN_CLASS_NOTIF
    | libc::FAN_CLOEXEC
    | libc::FAN_NONBLOCK
    | libc::FAN_REPORT_DFID_NAME
    | libc::FAN_REPORT_FID
    | libc::FAN_REPORT_TARGET_FID;
/// No FAN_MOVED_FROM/TO: FAN_RENAME alone gives both names in one event.
const MARK_MASK: u64 =
    FAN_CREATE | FAN_DELETE | FAN_RENAME | FAN_MODIFY | FAN_ATTRIB | FAN_CLOSE_WRITE | FAN_ONDIR;
/// `sizeof(struct fanotify_event_metadata)`.
const META_LEN: usize = 24;
const BUF_LEN: usize = 64 * 1024;
/// Reads per `read()` call, so a busy file system cannot keep us from returning.
const MAX_READS: usize = 16;
/// `MAX_HANDLE_SZ` from `linux/exportfs.h`.
const MAX_HANDLE_SZ: usize = 128;
const CACHE_MAX: usize = 4096;

/// Watches a job root through a fanotify filesystem mark.
///
/// Preferred over inotify because one mark covers the whole tree, including directories created
/// later, and renames arrive as one event with both names. Needs `CAP_SYS_ADMIN` and Linux 5.17+.
pub struct FanotifySource {
    fd: OwnedFd,
    buf: Vec<u8>,
    res: Resolver,
}

/// `struct file_handle` with room for the largest handle, reused for every `open_by_handle_at`.
#[repr(C)]
struct FileHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// Where a handle (plus name) lies relative to the root.
enum Loc {
    In(RelPath),
    Out,
    Gone,
}

/// Turns file handles into paths under the root.
struct Resolver {
    /// Fd of the root: the mount `open_by_handle_at` resolves handles in. `O_RDONLY`, not `O_PATH`:
    /// open_by_handle_at refuses an `O_PATH` mount fd with EBADF (seen on 6.18).
    mount_fd: OwnedFd,
    /// Canonical root path.
    root: Vec<u8>,
    /// Directory handle -> (handle type, path under the root or `None` for outside).
    dirs: HashMap<Box<[u8]>, (i32, Option<RelPath>)>,
    handle: FileHandle,
}

/// One file-handle info record: the handle and, for `*_NAME` records, the entry name (empty for the
/// object itself, which the kernel spells ".").
struct Fid<'a> {
    handle_type: i32,
    handle: &'a [u8],
    name: &'a [u8],
}

/// The info records of one event that we use.
#[derive(Default)]
struct Records<'a> {
    dir: Option<Fid<'a>>,
    old: Option<Fid<'a>>,
    new: Option<Fid<'a>>,
    obj: Option<Fid<'a>>,
}

impl FanotifySource {
    /// Sets up the fanotify group and the filesystem mark for `root` (a directory).
    ///
    /// Errors name the cause (no `CAP_SYS_ADMIN`, kernel too old, file system without file handles)
    /// so that the caller can log why it falls back to inotify.
    pub fn new(root: &Path) -> io::Result<Self> {
        let fail = |e: io::Error, cause: &str| {
            io::Error::new(e.kind(), format!("fanotify unavailable for {}: {cause} ({e})", root.display()))
        };
        let canon = std::fs::canonicalize(root).map_err(|e| fail(e, "cannot resolve the root"))?;
        let mount_fd =
            rustix::fs::open(&canon, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
                .map_err(|e| fail(e.into(), "cannot open the root directory"))?;
        let event_flags = (libc::O_RDONLY | libc::O_LARGEFILE) as libc::c_uint;
        // SAFETY: plain syscall taking two integer flag words.
        let raw = unsafe { libc::fanotify_init(INIT_FLAGS, event_flags) };
        if raw < 0 {
            let e = io::Error::last_os_error();
            let cause = match e.raw_os_error() {
                Some(libc::EPERM) => "fanotify_init needs CAP_SYS_ADMIN",
                Some(libc::EINVAL) => "kernel lacks FAN_REPORT_DFID_NAME/FAN_REPORT_TARGET_FID (needs 5.17+)",
                Some(libc::ENOSYS) => "kernel built without fanotify",
                Some(libc::EMFILE) => "too many fanotify groups (fs.fanotify.max_user_groups)",
                _ => "fanotify_init failed",
            };
            return Err(fail(e, cause));
        }
        // SAFETY: fanotify_init just returned this fd and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let flags = libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM;
        // SAFETY: the path is a NUL-terminated literal resolved against `mount_fd`, which is open.
        let rc = unsafe {
            libc::fanotify_mark(fd.as_raw_fd(), flags, MARK_MASK, mount_fd.as_raw_fd(), c".".as_ptr())
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            let cause = match e.raw_os_error() {
                Some(libc::EPERM) => "a filesystem mark needs CAP_SYS_ADMIN",
                Some(libc::EINVAL) => "kernel lacks FAN_RENAME or filesystem marks (needs 5.17+)",
                Some(libc::ENODEV) => "the file system has no fsid (e.g. FUSE)",
                Some(libc::EOPNOTSUPP) => "the file system cannot encode file handles",
                Some(libc::EXDEV) => "the root is on a subvolume or mount with a different fsid",
                Some(libc::ENOSPC) => "too many fanotify marks (fs.fanotify.max_user_marks)",
                _ => "fanotify_mark failed",
            };
            return Err(fail(e, cause));
        }
        let handle = FileHandle { handle_bytes: 0, handle_type: 0, f_handle: [0; MAX_HANDLE_SZ] };
        let root = canon.into_os_string().into_vec();
        let res = Resolver { mount_fd, root, dirs: HashMap::new(), handle };
        Ok(FanotifySource { fd, buf: vec![0; BUF_LEN], res })
    }
}

impl EventSource for FanotifySource {
    fn read(&mut self, out: &mut Vec<FsEvent>, timeout: Duration) -> io::Result<()> {
        // The mark sees the whole file system: keep waiting while only foreign events arrive.
        let deadline = Instant::now().checked_add(timeout);
        let start = out.len();
        loop {
            let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
            let ms = left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
            let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: `pfd` is one valid pollfd that lives across the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                return if e.kind() == io::ErrorKind::Interrupted { Ok(()) } else { Err(e) };
            }
            if rc == 0 {
                return Ok(());
            }
            self.drain(out)?;
            if out.len() > start || left.is_zero() {
                return Ok(());
            }
        }
    }

    fn backend(&self) -> &'static str {
        "fanotify"
    }
}

impl FanotifySource {
    /// Reads and maps what is queued, up to `MAX_READS` buffers.
    fn drain(&mut self, out: &mut Vec<FsEvent>) -> io::Result<()> {
        for _ in 0..MAX_READS {
            let n = match rustix::io::read(&self.fd, &mut self.buf[..]) {
                Ok(0) | Err(Errno::AGAIN) => break,
                Ok(n) => n,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let mut b = &self.buf[..n];
            while b.len() >= META_LEN {
                let event_len = u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize;
                let vers = b[4];
                let meta_len = u16::from_ne_bytes([b[6], b[7]]) as usize;
                let mask = u64::from_ne_bytes(b[8..16].try_into().unwrap());
                let fd = i32::from_ne_bytes(b[16..20].try_into().unwrap());
                if vers != libc::FANOTIFY_METADATA_VERSION {
                    let msg = format!(
                        "fanotify metadata version {vers}, expected {}",
                        libc::FANOTIFY_METADATA_VERSION
                    );
                    return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
                }
                if fd >= 0 {
                    // SAFETY: the kernel installed this fd for us; nobody else owns it. Closed here.
                    drop(unsafe { OwnedFd::from_raw_fd(fd) });
                }
                if event_len < META_LEN || event_len > b.len() || meta_len < META_LEN || meta_len > event_len
                {
                    tracing::warn!(event_len, meta_len, "malformed fanotify event, rescanning");
                    out.push(FsEvent::Rescan(RelPath::root()));
                    break;
                }
                self.res.event(mask, &b[meta_len..event_len], out);
                b = &b[event_len..];
            }
        }
        Ok(())
    }
}

impl Resolver {
    /// Maps one kernel event (which may carry several merged mask bits) to `FsEvent`s.
    fn event(&mut self, mask: u64, info: &[u8], out: &mut Vec<FsEvent>) {
        if mask & FAN_Q_OVERFLOW != 0 {
            self.dirs.clear();
            out.push(FsEvent::Rescan(RelPath::root()));
            return;
        }
        let recs = parse_records(info);
        let is_dir = mask & FAN_ONDIR != 0;
        if mask & FAN_RENAME != 0 {
            if is_dir {
                self.dirs.clear();
            }
            let from = recs.old.map_or(Loc::Out, |f| self.locate(&f, true));
            let to = recs.new.map_or(Loc::Out, |f| self.locate(&f, true));
            match (from, to) {
                (Loc::In(from), Loc::In(to)) => out.push(FsEvent::Renamed { from, to, is_dir }),
                (Loc::In(path), _) => out.push(FsEvent::Removed { path, is_dir }),
                (_, Loc::In(path)) => out.push(FsEvent::Created { path, is_dir }),
                _ => {}
            }
            return;
        }
        // Prefer parent + name; a FID alone is a self event, on a directory unless FAN_ONDIR is clear.
        let loc = match (recs.dir, recs.obj) {
            (Some(d), _) => self.locate(&d, true),
            (None, Some(o)) => self.locate(&o, is_dir),
            (None, None) => return,
        };
        let Loc::In(mut path) = loc else { return };
        // Merged bits, in the order they most plausibly happened.
        let bits = [FAN_CREATE, FAN_MODIFY, FAN_ATTRIB, FAN_CLOSE_WRITE, FAN_DELETE];
        let mut set = bits.iter().filter(|&&b| mask & b != 0).peekable();
        while let Some(&bit) = set.next() {
            let path = if set.peek().is_some() { path.clone() } else { std::mem::take(&mut path) };
            out.push(match bit {
                FAN_CREATE => FsEvent::Created { path, is_dir },
                FAN_MODIFY => FsEvent::Modified(path),
                FAN_ATTRIB => FsEvent::Attrib(path),
                FAN_CLOSE_WRITE => FsEvent::Closed(path),
                _ => FsEvent::Removed { path, is_dir },
            });
        }
    }

    /// Resolves `fid` (+ its name) to a path under the root. Directory handles go through the cache;
    /// other handles (files, which may have several names) are resolved every time.
    fn locate(&mut self, fid: &Fid<'_>, dir: bool) -> Loc {
        if !dir {
            return match self.resolve(fid) {
                Loc::In(p) => finish(Some(&p), fid.name),
                other => other,
            };
        }
        if let Some((_, entry)) = self.dirs.get(fid.handle).filter(|(t, _)| *t == fid.handle_type) {
            return finish(entry.as_ref(), fid.name);
        }
        let entry = match self.resolve(fid) {
            Loc::In(p) => Some(p),
            Loc::Out => None,
            Loc::Gone => return Loc::Gone,
        };
        let loc = finish(entry.as_ref(), fid.name);
        if self.dirs.len() >= CACHE_MAX {
            self.dirs.clear();
        }
        self.dirs.insert(fid.handle.into(), (fid.handle_type, entry));
        loc
    }

    /// `open_by_handle_at` + readlink, uncached.
    fn resolve(&mut self, fid: &Fid<'_>) -> Loc {
        let n = fid.handle.len(); // parse_fid bounds it by MAX_HANDLE_SZ
        self.handle.handle_bytes = n as u32;
        self.handle.handle_type = fid.handle_type;
        self.handle.f_handle[..n].copy_from_slice(fid.handle);
        let h = (&raw mut self.handle).cast::<libc::file_handle>();
        // SAFETY: `h` points to a live, initialized `struct file_handle` whose `handle_bytes` does not
        // exceed the bytes that follow it; `mount_fd` is open.
        let raw =
            unsafe { libc::open_by_handle_at(self.mount_fd.as_raw_fd(), h, libc::O_PATH | libc::O_CLOEXEC) };
        if raw < 0 {
            tracing::debug!(error = %io::Error::last_os_error(), "fanotify: cannot open handle, skipping event");
            return Loc::Gone;
        }
        // SAFETY: open_by_handle_at just returned this fd and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let abs = match std::fs::read_link(format!("/proc/self/fd/{raw}")) {
            Ok(p) => p.into_os_string().into_vec(),
            Err(e) => {
                tracing::debug!(error = %e, "fanotify: cannot read handle path, skipping event");
                return Loc::Gone;
            }
        };
        if abs.ends_with(b" (deleted)") && rustix::fs::fstat(&fd).is_ok_and(|st| st.st_nlink == 0) {
            tracing::debug!("fanotify: handle names a deleted object, skipping event");
            return Loc::Gone;
        }
        let rest = match abs.strip_prefix(&self.root[..]) {
            _ if self.root == b"/" => &abs[1..],
            Some([]) => return Loc::In(RelPath::root()),
            Some([b'/', rest @ ..]) => rest,
            _ => return Loc::Out,
        };
        match RelPath::new(rest) {
            Ok(p) => Loc::In(p),
            Err(e) => {
                tracing::warn!(error = %e, "fanotify: path under the root refused, skipping event");
                Loc::Gone
            }
        }
    }
}

/// `dir` + `name` (empty: `dir` itself); `None` means outside the root.
fn finish(dir: Option<&RelPath>, name: &[u8]) -> Loc {
    let Some(dir) = dir else { return Loc::Out };
    if name.is_empty() {
        return Loc::In(dir.clone());
    }
    match dir.join(name) {
        Ok(p) => Loc::In(p),
        Err(e) => {
            tracing::warn!(error = %e, "fanotify: name refused, skipping event");
            Loc::Gone
        }
    }
}

/// Splits the info records after the event metadata. Bounds-checked: a record whose length is too
/// short or runs past the event ends the parse.
fn parse_records(mut info: &[u8]) -> Records<'_> {
    let mut r = Records::default();
    while info.len() >= 4 {
        let kind = info[0];
        let len = u16::from_ne_bytes([info[2], info[3]]) as usize;
        if len < 4 || len > info.len() {
            tracing::debug!(kind, len, "fanotify: malformed info record");
            break;
        }
        let (rec, rest) = info.split_at(len);
        info = rest;
        let (slot, named) = match kind {
            libc::FAN_EVENT_INFO_TYPE_FID => (&mut r.obj, false),
            libc::FAN_EVENT_INFO_TYPE_DFID => (&mut r.dir, false),
            libc::FAN_EVENT_INFO_TYPE_DFID_NAME => (&mut r.dir, true),
            libc::FAN_EVENT_INFO_TYPE_OLD_DFID_NAME => (&mut r.old, true),
            libc::FAN_EVENT_INFO_TYPE_NEW_DFID_NAME => (&mut r.new, true),
            _ => continue,
        };
        *slot = parse_fid(&rec[4..], named);
    }
    r
}

/// Parses the body of a fid record: `__kernel_fsid_t fsid; struct file_handle { u32 handle_bytes;
/// i32 handle_type; u8 f_handle[handle_bytes]; }` and, if `named`, a NUL-terminated name.
fn parse_fid(body: &[u8], named: bool) -> Option<Fid<'_>> {
    let n = u32::from_ne_bytes(body.get(8..12)?.try_into().ok()?) as usize;
    let handle_type = i32::from_ne_bytes(body.get(12..16)?.try_into().ok()?);
    if n > MAX_HANDLE_SZ {
        return None;
    }
    let handle = body.get(16..16 + n)?;
    let mut name: &[u8] = &[];
    if named {
        let tail = &body[16 + n..];
        name = &tail[..tail.iter().position(|&b| b == 0)?];
    }
    if name == b"." {
        name = &[];
    }
    Some(Fid { handle_type, handle, name })
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    /// The source, or `None` where fanotify cannot run at all (not root, or a kernel without
    /// `FAN_REPORT_DFID_NAME`): the test is then skipped, or fails under
    /// `DOPPEL_TEST_STRICT=1`.
    fn source(root: &Path) -> Option<FanotifySource> {
        match FanotifySource::new(root) {
            Ok(s) => Some(s),
            Err(e) if matches!(e.kind(), io::ErrorKind::PermissionDenied | io::ErrorKind::InvalidInput) => {
                doppel_testkit::skip_or_fail(&format!("fanotify cannot watch {}: {e}", root.display()));
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// Reads until `pred` holds for an event in `seen` or 5 s pass.
    fn wait_for(src: &mut FanotifySource, seen: &mut Vec<FsEvent>, pred: impl Fn(&FsEvent) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !seen.iter().any(&pred) {
            assert!(Instant::now() < deadline, "timed out; events seen: {seen:#?}");
            src.read(seen, Duration::from_millis(100)).unwrap();
        }
    }

    fn pos(seen: &[FsEvent], ev: &FsEvent) -> usize {
        seen.iter().position(|e| e == ev).unwrap_or_else(|| panic!("{ev:?} not in {seen:#?}"))
    }

    fn mentions(ev: &FsEvent, name: &str) -> bool {
        format!("{ev:?}").contains(name)
    }

    #[test]
    fn create_write_close_chmod() {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let Some(mut src) = source(dir.path()) else { return };
        assert_eq!(src.backend(), "fanotify");
        let mut seen = Vec::new();
        fs::write(dir.path().join("f"), b"hello").unwrap();
        wait_for(&mut src, &mut seen, |e| *e == FsEvent::Closed(p("f")));
        let created = pos(&seen, &FsEvent::Created { path: p("f"), is_dir: false });
        let modified = pos(&seen, &FsEvent::Modified(p("f")));
        assert!(created < modified && modified < pos(&seen, &FsEvent::Closed(p("f"))), "{seen:#?}");
        fs::set_permissions(dir.path().join("f"), fs::Permissions::from_mode(0o600)).unwrap();
        wait_for(&mut src, &mut seen, |e| *e == FsEvent::Attrib(p("f")));
    }

    #[test]
    fn attrib_on_root_and_subdir() {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let Some(mut src) = source(dir.path()) else { return };
        let mut seen = Vec::new();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o750)).unwrap();
        wait_for(&mut src, &mut seen, |e| *e == FsEvent::Attrib(RelPath::root()));
        fs::create_dir(dir.path().join("d")).unwrap();
        fs::set_permissions(dir.path().join("d"), fs::Permissions::from_mode(0o700)).unwrap();
        wait_for(&mut src, &mut seen, |e| *e == FsEvent::Attrib(p("d")));
    }

    #[test]
    fn rename_file_is_one_event() {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let Some(mut src) = source(dir.path()) else { return };
        let mut seen = Vec::new();
        fs::write(dir.path().join("a"), b"x").unwrap();
        wait_for(&mut src, &mut seen, |e| *e == FsEvent::Closed(p("a")));
        seen.clear();
        fs::rename(dir.path().join("a"), dir.path().join("b")).unwrap();
        let renamed = FsEvent::Renamed { from: p("a"), to: p("b"), is_dir: false };
        wait_for(&mut src, &mut seen, |e| *e == renamed);
        // Drain a little more: nothing else may show up for the rename.
        src.read(&mut seen, Duration::from_millis(200)).unwrap();
        assert_eq!(seen, [renamed]);
    }

    #[test]
    fn mkdir_then_file_inside() {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let Some(mut src) = source(dir.path()) else { return };
        let mut seen = Vec::new();
        fs::create_dir(dir.path().join("d")).unwrap();
        fs::create_dir(dir.path().join("d/e")).unwrap();
        fs::write(dir.path().join("d/e/f"), b"x").unwrap();
        wait_for(&mut src, &mut seen, |e| *e == FsEvent::Closed(p("d/e/f")));
        let d = pos(&seen, &FsEvent::Created { path: p("d"), is_dir: true });
        let e = pos(&seen, &FsEvent::Created { path: p("d/e"), is_dir: true });
        assert!(d < e && e < pos(&seen, &FsEvent::Created { path: p("d/e/f"), is_dir: false }));
    }

    #[test]
    fn renamed_dir_reports_new_path() {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let Some(mut src) = source(dir.path()) else { return };
        let mut seen = Vec::new();
        fs::create_dir(dir.path().join("d")).unwrap();
        fs::write(dir.path().join("d/f"), b"x").unwrap();
        wait_for(&mut src, &mut seen, |e| *e == FsEvent::Closed(p("d/f")));
        seen.clear();
        fs::rename(dir.path().join("d"), dir.path().join("e")).unwrap();
        fs::write(dir.path().join("e/f"), b"y").unwrap();
        wait_for(&mut src, &mut seen, |e| *e == FsEvent::Closed(p("e/f")));
        let renamed = pos(&seen, &FsEvent::Renamed { from: p("d"), to: p("e"), is_dir: true });
        assert!(renamed < pos(&seen, &FsEvent::Modified(p("e/f"))), "{seen:#?}");
        assert!(!seen.iter().any(|e| mentions(e, "d/f")), "{seen:#?}");
    }

    #[test]
    fn delete_file_and_dirs() {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let Some(mut src) = source(dir.path()) else { return };
        let mut seen = Vec::new();
        fs::write(dir.path().join("f"), b"x").unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        fs::create_dir_all(dir.path().join("t/u")).unwrap();
        fs::write(dir.path().join("t/u/g"), b"x").unwrap();
        wait_for(&mut src, &mut seen, |e| *e == FsEvent::Closed(p("t/u/g")));
        fs::remove_file(dir.path().join("f")).unwrap();
        fs::remove_dir(dir.path().join("d")).unwrap();
        // By the time these are read the inner directories are gone: their events may be skipped,
        // but the top one must arrive.
        fs::remove_dir_all(dir.path().join("t")).unwrap();
        wait_for(&mut src, &mut seen, |e| *e == FsEvent::Removed { path: p("t"), is_dir: true });
        pos(&seen, &FsEvent::Removed { path: p("f"), is_dir: false });
        pos(&seen, &FsEvent::Removed { path: p("d"), is_dir: true });
    }

    #[test]
    fn outside_root_is_ignored() {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let other = tempfile::tempdir_in("/tmp").unwrap();
        let Some(mut src) = source(dir.path()) else { return };
        let mut seen = Vec::new();
        fs::write(other.path().join("outside"), b"x").unwrap();
        fs::create_dir(other.path().join("outdir")).unwrap();
        fs::write(dir.path().join("marker"), b"x").unwrap();
        // Events are queued in order, so anything about the sibling would come before the marker.
        wait_for(&mut src, &mut seen, |e| *e == FsEvent::Closed(p("marker")));
        assert!(seen.iter().all(|e| mentions(e, "marker")), "{seen:#?}");
    }

    #[test]
    fn move_in_and_out() {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let other = tempfile::tempdir_in("/tmp").unwrap();
        let Some(mut src) = source(dir.path()) else { return };
        let mut seen = Vec::new();
        fs::write(other.path().join("x"), b"x").unwrap();
        fs::create_dir(other.path().join("xd")).unwrap();
        fs::rename(other.path().join("x"), dir.path().join("x")).unwrap();
        fs::rename(other.path().join("xd"), dir.path().join("xd")).unwrap();
        wait_for(&mut src, &mut seen, |e| *e == FsEvent::Created { path: p("xd"), is_dir: true });
        pos(&seen, &FsEvent::Created { path: p("x"), is_dir: false });
        fs::rename(dir.path().join("x"), other.path().join("y")).unwrap();
        fs::rename(dir.path().join("xd"), other.path().join("yd")).unwrap();
        wait_for(&mut src, &mut seen, |e| *e == FsEvent::Removed { path: p("xd"), is_dir: true });
        pos(&seen, &FsEvent::Removed { path: p("x"), is_dir: false });
        assert!(!seen.iter().any(|e| mentions(e, "y")), "{seen:#?}");
    }

    #[test]
    fn malformed_records_stay_in_bounds() {
        // A DFID_NAME record claiming more bytes than the event has.
        let mut info = vec![libc::FAN_EVENT_INFO_TYPE_DFID_NAME, 0, 200, 0];
        info.extend_from_slice(&[0; 20]);
        assert!(parse_records(&info).dir.is_none());
        // Header (4), fsid (8), handle_bytes (4) at 12, handle_type (4) at 16, handle at 20.
        let mut rec = vec![libc::FAN_EVENT_INFO_TYPE_DFID_NAME, 0, 28, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        rec.extend_from_slice(&8u32.to_ne_bytes());
        rec.extend_from_slice(&1i32.to_ne_bytes());
        rec.extend_from_slice(b"12345678"); // the handle fills the record: no room for the name's NUL
        assert!(parse_records(&rec).dir.is_none());
        rec[12..16].copy_from_slice(&64u32.to_ne_bytes()); // handle longer than the record
        assert!(parse_records(&rec).dir.is_none());
        rec[12..16].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse_records(&rec).dir.is_none());
        // Well-formed: a 4-byte handle, then the name "." (the directory itself), then "ab".
        rec[12..16].copy_from_slice(&4u32.to_ne_bytes());
        rec[24..28].copy_from_slice(b".\0\0\0");
        let fid = parse_records(&rec).dir.unwrap();
        assert_eq!((fid.handle, fid.name, fid.handle_type), (&b"1234"[..], &b""[..], 1));
        rec[24..28].copy_from_slice(b"ab\0\0");
        assert_eq!(parse_records(&rec).dir.unwrap().name, b"ab");
        // A truncated record after a good one leaves the good one alone.
        rec.extend_from_slice(&[libc::FAN_EVENT_INFO_TYPE_FID, 0, 2, 0]);
        let r = parse_records(&rec);
        assert!(r.dir.is_some() && r.obj.is_none());
    }
}
