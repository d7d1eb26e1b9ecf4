//! Mount housekeeping: stale mounts left by a killed agent, and files that applications
//! opened before the mount (their writes bypass capture).

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The source name doppel's mounts show in `/proc/self/mountinfo` (the type is `fuse`, or
/// `fuse.doppel` when mounted through fusermount).
pub const SOURCE: &str = "doppel";

/// Mount points of doppel mounts, from `/proc/self/mountinfo`.
pub fn doppel_mounts() -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    info.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mut r = right.split_whitespace();
            let (fstype, source) = (r.next()?, r.next()?);
            let point = left.split_whitespace().nth(4)?;
            (fstype.starts_with("fuse") && source == SOURCE).then(|| PathBuf::from(unescape(point)))
        })
        .collect()
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo fields.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What was found at a job root before mounting.
#[derive(Debug, PartialEq, Eq)]
pub enum Existing {
    /// Nothing of doppel's.
    Clear,
    /// A doppel mount whose daemon died; it was detached.
    RecoveredStale,
}

/// Checks `root` for a doppel mount. A mount whose daemon is gone (the kernel answers
/// `ENOTCONN`) is detached so the underlying directory is reachable again; a live one is an
/// error (another process serves it).
pub fn recover_stale(root: &Path) -> io::Result<Existing> {
    let mounted = doppel_mounts().iter().any(|m| m == root);
    if !mounted {
        return Ok(Existing::Clear);
    }
    match std::fs::metadata(root) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            rustix::mount::unmount(root, rustix::mount::UnmountFlags::DETACH).map_err(|e| {
                io::Error::new(
                    io::Error::from(e).kind(),
                    format!("cannot detach the stale doppel mount at {}: {e}", root.display()),
                )
            })?;
            Ok(Existing::RecoveredStale)
        }
        _ => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} is already mounted by a running doppel process", root.display()),
        )),
    }
}

/// Where the kernel lists FUSE connections (the `fusectl` file system).
const CONNECTIONS: &str = "/sys/fs/fuse/connections";

/// Ends a FUSE connection at once: requests in flight and any later I/O on its files fail with
/// `ENOTCONN`. The only way to end a connection that a detached mount or another mount
/// namespace still holds. `dev` is the `st_dev` of the mount's root; `fusectl` is mounted
/// first when the system has not.
pub fn abort_connection(dev: u64) -> io::Result<()> {
    // The connection directory is named by the kernel's device number (major << 20 | minor);
    // FUSE mounts have anonymous devices, major 0.
    let id = (u64::from(rustix::fs::major(dev)) << 20) | u64::from(rustix::fs::minor(dev));
    let abort = Path::new(CONNECTIONS).join(id.to_string()).join("abort");
    if !abort.exists() && std::fs::read_dir(CONNECTIONS)?.next().is_none() {
        rustix::mount::mount("fusectl", CONNECTIONS, "fusectl", rustix::mount::MountFlags::empty(), None)
            .map_err(|e| {
                io::Error::new(
                    io::Error::from(e).kind(),
                    format!("cannot mount fusectl on {CONNECTIONS}: {e}"),
                )
            })?;
    }
    std::fs::write(&abort, b"1").map_err(|e| {
        io::Error::new(e.kind(), format!("cannot abort the FUSE connection ({}): {e}", abort.display()))
    })
}

/// Files under `root` that some process holds open right now, as `(pid, path)`.
pub fn open_files_under(root: &Path) -> Vec<(u32, PathBuf)> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return out };
    let prefix = root.as_os_str().as_bytes();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else { continue };
            let t = target.as_os_str().as_bytes();
            if t.starts_with(prefix)
                && (t.len() == prefix.len() || t[prefix.len()] == b'/')
                && t.len() > prefix.len()
            {
                out.push((pid, target));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn finds_own_open_files_of_other_processes() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("held");
        std::fs::write(&f, b"x").unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::fs::File::open(&f).unwrap())
            .spawn()
            .unwrap();
        let root = std::fs::canonicalize(d.path()).unwrap();
        let found = doppel_testkit_wait(|| {
            open_files_under(&root).iter().any(|(pid, p)| *pid == child.id() && p.ends_with("held"))
        });
        let _ = child.kill();
        let _ = child.wait();
        assert!(found);
    }

    fn doppel_testkit_wait(mut cond: impl FnMut() -> bool) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        false
    }
}
