//! Resolving replica paths strictly beneath a root.
//!
//! Every path a source sends is resolved with `openat2(2)` and
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV`: the
//! kernel itself refuses `..` escapes, absolute symlinks, symlinked parent directories, `/proc`
//! magic links and mount crossings, atomically, so there is no check-then-use race. The final
//! component is then acted on with `*at` calls on the parent directory handle and never followed
//! (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`), which is how symlinks are replicated as links.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use doppel_proto::RelPath;
use rustix::fs::{Mode, OFlags, ResolveFlags};

/// The resolution rules for everything beneath a replica root.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// A directory handle that confines every lookup to the tree below it.
#[derive(Debug)]
pub struct Beneath {
    root: OwnedFd,
    path: PathBuf,
}

impl Beneath {
    /// Opens `root` (which must be a directory). Symlinks in `root` itself are followed: the
    /// operator chose it; only what lies beneath is confined.
    pub fn open(root: &Path) -> io::Result<Beneath> {
        let root_fd =
            rustix::fs::open(root, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
                .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("{}: {e}", root.display())))?;
        Ok(Beneath { root: root_fd, path: root.to_path_buf() })
    }

    /// The root's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The root directory handle (opened for reading, so it also serves `syncfs`).
    pub fn root_fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Opens `path` beneath the root with `flags` (`O_CLOEXEC` and `O_NOFOLLOW` are always
    /// added). A symlink anywhere on the way, including the last component, fails with `ELOOP`;
    /// an escape fails with `EXDEV`. With `O_PATH` a final symlink is opened as the link itself.
    pub fn open_at(&self, path: &RelPath, flags: OFlags, mode: u32) -> io::Result<OwnedFd> {
        let p: &[u8] = if path.is_root() { b"." } else { path.as_bytes() };
        rustix::fs::openat2(
            self.root.as_fd(),
            p,
            flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(mode),
            RESOLVE,
        )
        .map_err(io::Error::from)
    }

    /// Opens a directory beneath the root as a handle for `*at` calls.
    pub fn dir(&self, path: &RelPath) -> io::Result<OwnedFd> {
        self.open_at(path, OFlags::PATH | OFlags::DIRECTORY, 0)
    }

    /// The parent directory handle of `path` and its last name, for acting on the name itself
    /// with `*at` calls. Fails for the root, which has no name.
    pub fn parent<'p>(&self, path: &'p RelPath) -> io::Result<(OwnedFd, &'p [u8])> {
        let (parent, _) = path
            .split_last()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the replica root has no parent"))?;
        let name = path.name();
        Ok((self.dir(&parent)?, name))
    }
}

/// Whether an error from resolution means the path tried to leave the tree or pass through a
/// symlink (as opposed to simply not existing), so callers can word their refusal.
pub fn is_escape(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::EXDEV))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn confines_lookups() {
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("r");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(outer.path().join("secret"), b"s").unwrap();
        symlink("..", root.join("up")).unwrap();
        symlink(outer.path(), root.join("abs")).unwrap();
        symlink("d", root.join("inner")).unwrap();
        let b = Beneath::open(&root).unwrap();
        let rp = |s: &str| RelPath::new(s).unwrap();
        for bad in ["up/secret", "abs/secret", "inner/x"] {
            let e = b.open_at(&rp(bad), OFlags::RDONLY, 0).unwrap_err();
            assert!(is_escape(&e), "{bad}: {e}");
            let e = b.parent(&rp(&format!("{bad}/deeper"))).unwrap_err();
            assert!(is_escape(&e), "{bad}: {e}");
        }
        // A final symlink is not followed: opening it for writing fails, O_PATH gets the link.
        assert!(is_escape(&b.open_at(&rp("up"), OFlags::WRONLY, 0).unwrap_err()));
        b.open_at(&rp("up"), OFlags::PATH, 0).unwrap();
        b.dir(&rp("d")).unwrap();
        b.dir(&RelPath::root()).unwrap();
        let df = rp("d/f");
        let (_, name) = b.parent(&df).unwrap();
        assert_eq!(name, b"f");
        assert!(b.parent(&RelPath::root()).is_err());
    }
}

/// The canonical form `p` will have once made: its deepest existing ancestor resolved (links
/// followed), the names below it appended. For judging whether a directory about to be made
/// would lie inside another before making it.
pub fn canonical_to_be(p: &Path) -> io::Result<PathBuf> {
    let mut missing = Vec::new();
    let mut at = p;
    while !at.exists() {
        let (Some(parent), Some(name)) = (at.parent(), at.file_name()) else { break };
        missing.push(name.to_owned());
        at = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    }
    let mut out = std::fs::canonicalize(at)?;
    out.extend(missing.iter().rev());
    Ok(out)
}

#[cfg(test)]
mod canonical_tests {
    #[test]
    fn a_path_not_made_yet_resolves_through_its_existing_ancestors() {
        let d = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(d.path()).unwrap();
        std::os::unix::fs::symlink(&real, real.join("link")).unwrap();
        let got = super::canonical_to_be(&real.join("link/a/b")).unwrap();
        assert_eq!(got, real.join("a/b"));
        assert!(!real.join("a").exists(), "nothing is made");
        assert_eq!(super::canonical_to_be(&real).unwrap(), real);
    }
}
