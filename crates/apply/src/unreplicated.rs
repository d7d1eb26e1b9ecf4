//! Names the source has and the replica does not, because the target refused to make them (a
//! device node under a `devices = "refuse"` policy, say).
//!
//! Every later op on such a name (its mode, times, a rename, its removal) would fail on the
//! replica and be refused again, one warning each: thousands for one device node a program
//! touches. Once a name is refused it is kept here instead, with the reason, and the ops that
//! touch only it are skipped quietly; renames carry it along (with what lies beneath it), a
//! removal or a new name made in its place forgets it. `doppel status` shows the list and
//! `verify` reports each as missing on the replica, so the replica is never called equal.
//!
//! The list is kept beside the replica's state (`unreplicated.json`), written when it
//! changes, so a restarted target still knows its names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use doppel_proto::{Op, WirePath};
use serde::{Deserialize, Serialize};

/// The file in the replica's state directory.
const FILE: &str = "unreplicated.json";

/// Names kept at most (a source making millions of refused names is told so in the count,
/// not in the list; past it, ops on the extra names are refused as before).
const MAX_NAMES: usize = 100_000;

/// One name not on the replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnreplicatedName {
    /// The name, relative to the replica's root.
    pub path: String,
    /// Why the replica does not have it.
    pub reason: String,
}

/// What to do with an op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Apply it.
    Apply,
    /// It touches only unreplicated names: skip it (it is not an error).
    Skip,
}

/// The list.
#[derive(Debug, Default)]
pub struct Unreplicated {
    file: Option<PathBuf>,
    names: BTreeMap<Vec<u8>, String>,
}

fn below(name: &[u8], dir: &[u8]) -> bool {
    name.len() > dir.len() && name.starts_with(dir) && name[dir.len()] == b'/'
}

impl Unreplicated {
    /// The list kept in `state_dir` (empty if none was kept, or it cannot be read).
    pub fn load(state_dir: &Path) -> Unreplicated {
        let file = state_dir.join(FILE);
        let names = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<Vec<(WirePath, String)>>(&b).ok())
            .map(|v| v.into_iter().map(|(p, r)| (p.0, r)).collect())
            .unwrap_or_default();
        Unreplicated { file: Some(file), names }
    }

    /// How many names.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The first `max` names, in order.
    pub fn list(&self, max: usize) -> Vec<UnreplicatedName> {
        self.names
            .iter()
            .take(max)
            .map(|(p, r)| UnreplicatedName {
                path: String::from_utf8_lossy(p).into_owned(),
                reason: r.clone(),
            })
            .collect()
    }

    fn has(&self, p: &WirePath) -> bool {
        self.names.contains_key(&p.0)
    }

    /// `op` was refused for `reason`: the name it would have made is recorded. Returns
    /// whether the list changed.
    pub fn refused(&mut self, op: &Op, reason: &str) -> bool {
        let path = match op {
            Op::Mknod { path, .. }
            | Op::Create { path, .. }
            | Op::Symlink { path, .. }
            | Op::Link { path, .. } => path,
            _ => return false,
        };
        // A name that is not a valid path beneath the root is never kept: ops naming it must go
        // on being refused as hostile.
        if doppel_proto::RelPath::try_from(path).is_err() || self.names.len() >= MAX_NAMES {
            return false;
        }
        self.names.insert(path.0.clone(), reason.to_string());
        self.save();
        true
    }

    /// What to do with `op`, updating the list for the names it moves or removes.
    pub fn judge(&mut self, op: &Op) -> Verdict {
        if self.names.is_empty() {
            return Verdict::Apply;
        }
        let (verdict, changed) = match op {
            Op::Unlink { path } | Op::Rmdir { path } => match self.names.remove(&path.0) {
                Some(_) => (Verdict::Skip, true),
                None => (Verdict::Apply, false),
            },
            Op::Create { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Symlink { path, .. }
            | Op::Mknod { path, .. } => {
                // A new object in the name's place: replicated (or refused, and recorded again).
                (Verdict::Apply, self.names.remove(&path.0).is_some())
            }
            Op::Link { path, existing } => {
                if self.has(existing) {
                    let reason = self.names[&existing.0].clone();
                    self.names.insert(path.0.clone(), reason);
                    (Verdict::Skip, true)
                } else {
                    (Verdict::Apply, self.names.remove(&path.0).is_some())
                }
            }
            Op::Rename { from, to, .. } => self.rename(from, to),
            Op::Write { path, .. }
            | Op::Truncate { path, .. }
            | Op::SetAttr { path, .. }
            | Op::Fallocate { path, .. } => {
                (if self.has(path) { Verdict::Skip } else { Verdict::Apply }, false)
            }
            Op::Fsync { path: Some(path) } if self.has(path) => (Verdict::Skip, false),
            Op::Fsync { .. } | Op::Point { .. } => (Verdict::Apply, false),
        };
        if changed {
            self.save();
        }
        verdict
    }

    /// A rename: the names at and beneath `from` move to `to`; a replicated `from` replaces
    /// an unreplicated `to`.
    fn rename(&mut self, from: &WirePath, to: &WirePath) -> (Verdict, bool) {
        let moved: Vec<(Vec<u8>, String)> = self
            .names
            .iter()
            .filter(|(n, _)| n.as_slice() == from.0.as_slice() || below(n, &from.0))
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect();
        let whole = self.names.contains_key(&from.0);
        let mut changed = self.names.remove(&to.0).is_some();
        for (n, r) in moved {
            self.names.remove(&n);
            let mut new = to.0.clone();
            new.extend_from_slice(&n[from.0.len()..]);
            self.names.insert(new, r);
            changed = true;
        }
        // The object itself is not on the replica: nothing to rename there.
        (if whole { Verdict::Skip } else { Verdict::Apply }, changed)
    }

    /// Writes the list (aside, then renamed; not synced: a lost update makes the ops it
    /// covered refused again, which records them again).
    fn save(&self) {
        let Some(file) = &self.file else { return };
        let v: Vec<(WirePath, &String)> = self.names.iter().map(|(p, r)| (WirePath(p.clone()), r)).collect();
        let tmp = file.with_extension("json.tmp");
        let written = serde_json::to_vec(&v)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, file));
        if let Err(e) = written {
            tracing::warn!(file = %file.display(), error = %e, "cannot keep the list of unreplicated names");
        }
    }
}

#[cfg(test)]
mod tests {
    use doppel_proto::{Attrs, RenameFlags};

    use super::*;

    fn w(s: &str) -> WirePath {
        WirePath(s.as_bytes().to_vec())
    }

    fn names(u: &Unreplicated) -> Vec<String> {
        u.list(100).into_iter().map(|n| n.path).collect()
    }

    #[test]
    fn ops_on_a_refused_name_are_skipped_and_follow_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut u = Unreplicated::load(dir.path());
        let mknod = Op::Mknod { path: w("d/null"), mode: 0o20644, rdev: 0x103 };
        assert_eq!(u.judge(&mknod), Verdict::Apply);
        assert!(u.refused(&mknod, "devices are refused"));
        let chmod = Op::SetAttr { path: w("d/null"), attrs: Attrs { mode: Some(0o600), ..Attrs::default() } };
        assert_eq!(u.judge(&chmod), Verdict::Skip);
        let other = Op::SetAttr { path: w("d/file"), attrs: Attrs::default() };
        assert_eq!(u.judge(&other), Verdict::Apply);
        // A hard link to it is not on the replica either.
        assert_eq!(u.judge(&Op::Link { path: w("d/null2"), existing: w("d/null") }), Verdict::Skip);
        // Its directory is renamed: the names follow; the directory itself is replicated.
        let mv = Op::Rename { from: w("d"), to: w("e"), flags: RenameFlags::default() };
        assert_eq!(u.judge(&mv), Verdict::Apply);
        assert_eq!(names(&u), ["e/null", "e/null2"]);
        // Kept across a restart.
        let mut u = Unreplicated::load(dir.path());
        assert_eq!(names(&u), ["e/null", "e/null2"]);
        assert_eq!(u.list(1)[0].reason, "devices are refused");
        // Renamed itself: skipped, and known under its new name.
        let mv = Op::Rename { from: w("e/null"), to: w("e/zero"), flags: RenameFlags::default() };
        assert_eq!(u.judge(&mv), Verdict::Skip);
        assert_eq!(u.judge(&Op::Unlink { path: w("e/zero") }), Verdict::Skip);
        // A regular file made in the other's place is replicated, and the name forgotten.
        assert_eq!(u.judge(&Op::Create { path: w("e/null2"), mode: 0o644 }), Verdict::Apply);
        assert!(u.is_empty());
        assert_eq!(u.judge(&Op::Unlink { path: w("e/null2") }), Verdict::Apply);
    }

    #[test]
    fn a_replicated_name_renamed_over_a_refused_one_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut u = Unreplicated::load(dir.path());
        u.refused(&Op::Mknod { path: w("x"), mode: 0o60644, rdev: 1 }, "refused");
        let mv = Op::Rename { from: w("file"), to: w("x"), flags: RenameFlags::default() };
        assert_eq!(u.judge(&mv), Verdict::Apply);
        assert!(u.is_empty());
        // "xy" is not beneath "x".
        u.refused(&Op::Mknod { path: w("xy"), mode: 0o60644, rdev: 1 }, "refused");
        let mv = Op::Rename { from: w("x"), to: w("z"), flags: RenameFlags::default() };
        assert_eq!(u.judge(&mv), Verdict::Apply);
        assert_eq!(names(&u), ["xy"]);
    }
}
