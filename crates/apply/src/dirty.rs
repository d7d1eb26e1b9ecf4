//! What a replica changed since its last commit, so a commit makes durable only that.
//!
//! Many sources share the target's file system. `syncfs` makes everything on it durable, so one
//! busy source's gigabytes of dirty pages would stretch every other source's commit (and each
//! `Fsync` op of any source would flush everyone's). A commit of a few changes instead `fsync`s
//! exactly the files whose data or attributes changed and the directories whose entries
//! changed. Past [`LIMIT`] names, or after a rename that moves names already noted (their
//! paths no longer lead to them), one `syncfs` is cheaper and always right, and is used.

use std::collections::HashSet;
use std::os::fd::OwnedFd;

use doppel_fs::Beneath;
use doppel_proto::{Op, RelPath, WirePath};
use rustix::fs::OFlags;

/// Names noted before a commit falls back to one `syncfs`.
pub const LIMIT: usize = 256;

/// The changes since the last commit.
#[derive(Debug, Default)]
pub struct Dirty {
    files: HashSet<RelPath>,
    dirs: HashSet<RelPath>,
    /// Too many, or moved: the commit syncs the whole file system.
    whole: bool,
}

/// How a commit makes the changes durable.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing changed.
    Nothing,
    /// `syncfs` of the replica's file system.
    Whole,
    /// `fsync` of these files and directories.
    Names(Vec<RelPath>),
}

fn rel(w: &WirePath) -> Option<RelPath> {
    RelPath::try_from(w).ok()
}

fn parent(p: &RelPath) -> RelPath {
    p.split_last().map(|(d, _)| d).unwrap_or_else(RelPath::root)
}

impl Dirty {
    /// Changes that cannot be listed: the next commit syncs the whole file system.
    pub fn everything() -> Dirty {
        Dirty { whole: true, ..Dirty::default() }
    }

    /// Notes what the applied `op` changed.
    pub fn note(&mut self, op: &Op) {
        if self.whole {
            return;
        }
        match op {
            Op::Write { path, .. }
            | Op::Truncate { path, .. }
            | Op::Fallocate { path, .. }
            | Op::SetAttr { path, .. } => self.file(path),
            Op::Create { path, .. } => {
                self.file(path);
                self.entry(path);
            }
            Op::Mkdir { path, .. } => {
                self.dir(path);
                self.entry(path);
            }
            Op::Symlink { path, .. } | Op::Mknod { path, .. } | Op::Link { path, .. } => self.entry(path),
            Op::Unlink { path } | Op::Rmdir { path } => self.entry(path),
            Op::Rename { from, to, .. } => match (rel(from), rel(to)) {
                (Some(f), Some(t)) if !self.moves_noted(&f) && !self.moves_noted(&t) => {
                    self.dirs.insert(parent(&f));
                    self.dirs.insert(parent(&t));
                }
                _ => self.whole = true,
            },
            Op::Fsync { .. } | Op::Point { .. } => {}
        }
        if self.files.len() + self.dirs.len() > LIMIT {
            self.whole = true;
        }
    }

    /// Whether a name noted lies at or beneath `p` (a rename of `p` would strand it).
    fn moves_noted(&self, p: &RelPath) -> bool {
        self.files.iter().chain(&self.dirs).any(|n| n.starts_with(p))
    }

    fn file(&mut self, w: &WirePath) {
        match rel(w) {
            Some(p) => {
                self.files.insert(p);
            }
            None => self.whole = true,
        }
    }

    fn dir(&mut self, w: &WirePath) {
        match rel(w) {
            Some(p) => {
                self.dirs.insert(p);
            }
            None => self.whole = true,
        }
    }

    /// The directory holding the name `w` changed.
    fn entry(&mut self, w: &WirePath) {
        match rel(w) {
            Some(p) => {
                self.dirs.insert(parent(&p));
            }
            None => self.whole = true,
        }
    }

    /// What the next commit must do; forgets the changes.
    pub fn take(&mut self) -> Plan {
        let d = std::mem::take(self);
        if d.whole {
            return Plan::Whole;
        }
        if d.files.is_empty() && d.dirs.is_empty() {
            return Plan::Nothing;
        }
        // Files first, then directories, deepest first: a new name is durable once its
        // inode and then every directory on the way are.
        let mut dirs: Vec<RelPath> = d.dirs.into_iter().collect();
        dirs.sort_by_key(|p| std::cmp::Reverse(p.to_string().matches('/').count()));
        Plan::Names(d.files.into_iter().chain(dirs).collect())
    }
}

/// Carries out `plan` beneath `root`.
pub fn sync(root: &Beneath, plan: Plan) -> std::io::Result<()> {
    Opened::of(root, plan)?.sync()
}

/// A [`Plan`] whose names are opened, so that it can be carried out on another thread while
/// more ops are applied: a name renamed meanwhile is still the object the plan means.
#[derive(Debug)]
pub enum Opened {
    /// Nothing to sync.
    Nothing,
    /// `syncfs` of the file system holding this directory.
    Whole(OwnedFd),
    /// `fsync` of each, in order.
    Each(Vec<OwnedFd>),
}

impl Opened {
    /// Opens what `plan` names beneath `root` (a name gone since needs nothing).
    pub fn of(root: &Beneath, plan: Plan) -> std::io::Result<Opened> {
        Ok(match plan {
            Plan::Nothing => Opened::Nothing,
            Plan::Whole => Opened::Whole(root.root_fd().try_clone_to_owned()?),
            Plan::Names(names) => {
                let mut fds = Vec::with_capacity(names.len());
                for p in names {
                    fds.extend(open_name(root, &p)?);
                }
                Opened::Each(fds)
            }
        })
    }

    /// Makes it durable.
    pub fn sync(self) -> std::io::Result<()> {
        match self {
            Opened::Nothing => Ok(()),
            Opened::Whole(fd) => rustix::fs::syncfs(&fd).map_err(Into::into),
            Opened::Each(fds) => fds.iter().try_for_each(|fd| rustix::fs::fsync(fd).map_err(Into::into)),
        }
    }
}

/// What to `fsync` for the name `p`: the file or directory itself; for anything else (a
/// symlink, a FIFO, a device node, which are not opened for reading) its directory, whose sync
/// commits the inode's change with it on a journalling file system. A name gone since needs
/// nothing (`None`): its directory's sync covers its removal.
fn open_name(root: &Beneath, p: &RelPath) -> std::io::Result<Option<OwnedFd>> {
    let gone = |e: &std::io::Error| {
        e.kind() == std::io::ErrorKind::NotFound
            || doppel_fs::beneath::is_escape(e)
            || e.raw_os_error() == Some(libc::ENOTDIR)
    };
    let st = match root.open_at(p, OFlags::PATH, 0).and_then(|fd| rustix::fs::fstat(&fd).map_err(Into::into))
    {
        Ok(st) => st,
        Err(e) if gone(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let kind = st.st_mode & libc::S_IFMT;
    let target = if kind == libc::S_IFREG || kind == libc::S_IFDIR { p.clone() } else { parent(p) };
    match root.open_at(&target, OFlags::RDONLY | OFlags::NONBLOCK, 0) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if gone(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> WirePath {
        WirePath(s.as_bytes().to_vec())
    }

    fn names(plan: Plan) -> Vec<String> {
        match plan {
            Plan::Names(n) => {
                let mut v: Vec<String> = n.iter().map(|p| p.to_string()).collect();
                v.sort();
                v
            }
            other => panic!("expected names, got {other:?}"),
        }
    }

    #[test]
    fn a_commit_syncs_what_changed_and_falls_back_when_it_cannot_tell() {
        let mut d = Dirty::default();
        assert_eq!(d.take(), Plan::Nothing);
        d.note(&Op::Mkdir { path: w("d"), mode: 0o755 });
        d.note(&Op::Create { path: w("d/f"), mode: 0o644 });
        d.note(&Op::Write { path: w("d/f"), offset: 0, data: vec![1] });
        d.note(&Op::Unlink { path: w("old") });
        d.note(&Op::Fsync { path: Some(w("d/f")) });
        let got = names(d.take());
        assert!(got.contains(&"d".to_string()) && got.contains(&"d/f".to_string()), "{got:?}");
        assert!(
            got.iter().any(|n| n.is_empty() || n == "/" || n == "."),
            "the root's entries changed: {got:?}"
        );
        assert_eq!(d.take(), Plan::Nothing, "taken");
        // A rename of a name not noted: both parents.
        d.note(&Op::Rename { from: w("a/x"), to: w("b/y"), flags: Default::default() });
        assert_eq!(names(d.take()), ["a", "b"]);
        // A rename moving a noted name: its path no longer leads to it.
        d.note(&Op::Write { path: w("a/x"), offset: 0, data: vec![1] });
        d.note(&Op::Rename { from: w("a"), to: w("c"), flags: Default::default() });
        assert_eq!(d.take(), Plan::Whole);
        for i in 0..=LIMIT {
            d.note(&Op::Write { path: w(&format!("f{i}")), offset: 0, data: vec![1] });
        }
        assert_eq!(d.take(), Plan::Whole, "past the limit");
    }
}
