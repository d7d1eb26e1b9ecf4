//! Measuring what one op changes in a source's use, for its [`Account`].
//!
//! Before the op: what it may need (refused if over quota) and what is there now (the inode a
//! removal or a rename over it frees, a file's allocated bytes before a write). After it: what
//! is there then. The difference is recorded; a replayed op finds the tree already changed and
//! records nothing.

use std::os::fd::OwnedFd;

use doppel_fs::Beneath;
use doppel_proto::{Op, RelPath, WirePath};

use crate::error::ApplyError;
use crate::ops::OpenFile;
use crate::quota::{Account, Footprint, Usage, footprint_at, new_allocation, upper_bound};

/// What was there before an op, to compare with after it.
pub(crate) enum Before {
    /// Nothing to measure.
    Nothing,
    /// The allocated bytes of the file a data op changes.
    Data(RelPath, u64),
    /// Whether a name a create makes was absent.
    Create(RelPath, bool),
    /// The inode a removal (or a rename over it) would free.
    Removes(RelPath, Option<Footprint>),
}

fn rel(w: &WirePath) -> Option<RelPath> {
    RelPath::try_from(w).ok().filter(|p| !p.is_root())
}

fn at(root: &Beneath, p: &RelPath) -> Option<Footprint> {
    let (dir, name): (OwnedFd, &[u8]) = root.parent(p).ok()?;
    footprint_at(&dir, name)
}

fn blocks(root: &Beneath, open: &mut OpenFile, p: &RelPath) -> Option<u64> {
    let fd = open.get(root, p).ok()?;
    rustix::fs::fstat(fd).ok().map(|st| st.st_blocks as u64 * 512)
}

/// Refuses `op` if it would take the account over a limit (measuring precisely only when the
/// cheap upper bound does not fit).
pub(crate) fn admit(
    account: &Account,
    root: &Beneath,
    open: &mut OpenFile,
    seq: u64,
    op: &Op,
) -> Result<(), ApplyError> {
    let Some(bound) = upper_bound(op) else { return Ok(()) };
    if account.admit(bound).is_ok() {
        return Ok(());
    }
    let need = match op {
        Op::Write { path, offset, data } => data_need(root, open, path, *offset, data.len() as u64),
        Op::Fallocate { path, offset, len, .. } => data_need(root, open, path, *offset, *len),
        // A name that exists already (a replay) takes nothing more.
        Op::Create { path, .. }
        | Op::Mkdir { path, .. }
        | Op::Symlink { path, .. }
        | Op::Mknod { path, .. } => match rel(path) {
            Some(p) if at(root, &p).is_some() => Usage::default(),
            _ => bound,
        },
        _ => bound,
    };
    account.admit(need).map_err(|over| ApplyError::OverQuota { seq, kind: op.kind(), over })
}

fn data_need(root: &Beneath, open: &mut OpenFile, path: &WirePath, offset: u64, len: u64) -> Usage {
    let bytes = rel(path)
        .and_then(|p| open.get(root, &p).ok().and_then(|fd| new_allocation(fd, offset, len).ok()))
        // The op will fail on its own (no such file): it needs nothing.
        .unwrap_or(0);
    Usage { bytes, files: 0 }
}

/// Looks at what `op` will change.
pub(crate) fn before(root: &Beneath, open: &mut OpenFile, op: &Op) -> Before {
    match op {
        Op::Write { path, .. } | Op::Truncate { path, .. } | Op::Fallocate { path, .. } => {
            let Some(p) = RelPath::try_from(path).ok() else { return Before::Nothing };
            match blocks(root, open, &p) {
                Some(b) => Before::Data(p, b),
                None => Before::Nothing,
            }
        }
        Op::Create { path, .. }
        | Op::Mkdir { path, .. }
        | Op::Symlink { path, .. }
        | Op::Mknod { path, .. } => match rel(path) {
            Some(p) => {
                let absent = at(root, &p).is_none();
                Before::Create(p, absent)
            }
            None => Before::Nothing,
        },
        Op::Unlink { path } | Op::Rmdir { path } => match rel(path) {
            Some(p) => {
                let f = at(root, &p);
                Before::Removes(p, f)
            }
            None => Before::Nothing,
        },
        Op::Rename { from, to, flags } if !flags.exchange => match (rel(from), rel(to)) {
            (Some(f), Some(t)) => {
                let (a, b) = (at(root, &f), at(root, &t));
                // Renaming a name onto another name of the same inode frees nothing.
                let freed = b.filter(|b| a.is_some_and(|a| a.id != b.id));
                Before::Removes(t, freed)
            }
            _ => Before::Nothing,
        },
        _ => Before::Nothing,
    }
}

/// Records what the applied op changed, compared with `before`.
pub(crate) fn after(account: &Account, root: &Beneath, open: &mut OpenFile, before: Before, op: &Op) {
    match before {
        Before::Nothing => {}
        Before::Data(p, was) => {
            if let Some(now) = blocks(root, open, &p) {
                account.record(Usage { bytes: now, files: 0 }, Usage { bytes: was, files: 0 });
            }
        }
        Before::Create(p, true) => {
            if let Some(f) = at(root, &p) {
                account.record(Usage { bytes: f.bytes, files: 1 }, Usage::default());
            }
        }
        Before::Create(_, false) => {}
        Before::Removes(p, Some(f)) => {
            // A rename's destination now names the moved inode; an unlinked name is gone.
            let replaced = match op {
                Op::Rename { .. } => true,
                _ => at(root, &p).is_none(),
            };
            if replaced {
                account.record(Usage::default(), f.freed());
            }
        }
        Before::Removes(_, None) => {}
    }
}
