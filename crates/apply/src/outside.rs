//! Names a replica's tree keeps out of the stream: a source's own names during a failback.
//!
//! A source receiving its replica back applies the DR side's stream to its own tree, and that
//! tree holds names the job's rules leave out (scratch files, caches) that were never
//! replicated. The DR side never hears of them (listings leave them out, see
//! [`crate::listing::list_knowing`]), so its comparison neither removes nor replaces them. Its
//! workload may still make names the rules leave out, some where the source keeps a name of
//! its own (a `*.tmp` of the same name), and rename them into the selection later (a report
//! written as `report.tmp`, then renamed `report`). So a name outside the selection is one of
//! two kinds:
//!
//! - **the tree's own**, there before the stream made it: never removed, replaced, changed,
//!   moved or written into; ops on it or beneath it are skipped;
//! - **made by the stream** in this replica: applied like any name, so a rename into the
//!   selection carries what the stream wrote.
//!
//! Only the shallowest name outside the selection is recorded (what lies beneath goes with
//! it). The list is kept beside the replica's state (`outside.json`), written at each commit,
//! not synced: a lost update makes a name the stream made look like the tree's own, so its
//! later ops are skipped. That is the safe way to be wrong: a source's own name is never
//! taken for the stream's.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use doppel_fs::{Beneath, Selection};
use doppel_proto::{Op, RelPath, WirePath};

/// The file in the replica's state directory.
const FILE: &str = "outside.json";

/// Names the stream made that are recorded at most (past it, further names it makes look
/// like the tree's own, and their later ops are skipped).
const MAX_NAMES: usize = 100_000;

/// What to do with an op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Apply it.
    Apply,
    /// It would touch a name the tree keeps out of the stream: skip it (not an error).
    Skip,
    /// Apply this op instead: a rename onto a name the tree keeps becomes the removal of
    /// the old name (the stream's side no longer has it; the kept name stays).
    Instead(Op),
}

/// Where a name stands.
#[derive(Debug, PartialEq, Eq)]
enum Place {
    /// Selected by the rules: the stream's.
    Selected,
    /// Outside, beneath (or at) this name the stream made.
    Made(RelPath),
    /// Outside, beneath (or at) this name of the tree's own.
    Own,
    /// Outside, and the shallowest name outside (given) is not there yet.
    New(RelPath),
}

/// The rules and the names the stream made outside them.
#[derive(Debug, Default)]
pub struct Outside {
    selection: Selection,
    made: BTreeSet<RelPath>,
    file: Option<PathBuf>,
    unsaved: bool,
}

impl Outside {
    /// The rules of a tree that keeps nothing out: every op is applied.
    pub fn none() -> Outside {
        Outside::default()
    }

    /// `selection`'s rules, with the names the stream made kept in `state_dir` (none yet, if
    /// none were kept, or the list cannot be read: then they count as the tree's own).
    pub fn load(state_dir: &Path, selection: Selection) -> Outside {
        let file = state_dir.join(FILE);
        let made = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<Vec<WirePath>>(&b).ok())
            .into_iter()
            .flatten()
            .filter_map(|w| RelPath::try_from(&w).ok())
            .collect();
        Outside { selection, made, file: Some(file), unsaved: false }
    }

    /// The rules.
    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    /// Whether every name is selected (nothing is judged).
    pub fn keeps_nothing(&self) -> bool {
        self.selection.selects_everything()
    }

    /// What to do with `op` on the tree beneath `root`, recording the names it makes, moves
    /// or removes outside the selection.
    pub fn judge(&mut self, op: &Op, root: &Beneath) -> Verdict {
        if self.keeps_nothing() {
            return Verdict::Apply;
        }
        self.judge_with(op, &|p| kind_at(root, p))
    }

    /// [`Outside::judge`], learning what the tree holds at a name from `probe` (`None`:
    /// nothing; `Some(true)`: a directory).
    fn judge_with(&mut self, op: &Op, probe: &dyn Fn(&RelPath) -> Option<bool>) -> Verdict {
        let path = |w: &WirePath| RelPath::try_from(w).ok();
        match op {
            Op::Create { path: w, .. } | Op::Symlink { path: w, .. } | Op::Mknod { path: w, .. } => {
                path(w).map_or(Verdict::Apply, |p| self.making(&p, false, probe))
            }
            Op::Mkdir { path: w, .. } => path(w).map_or(Verdict::Apply, |p| self.making(&p, true, probe)),
            Op::Link { path: w, existing } => match (path(w), path(existing)) {
                (Some(_), Some(e)) if self.place(&e, false, probe) == Place::Own => Verdict::Skip,
                (Some(p), _) => self.making(&p, false, probe),
                _ => Verdict::Apply,
            },
            Op::Unlink { path: w } => path(w).map_or(Verdict::Apply, |p| self.removing(&p, false, probe)),
            Op::Rmdir { path: w } => path(w).map_or(Verdict::Apply, |p| self.removing(&p, true, probe)),
            Op::Rename { from, to, flags } => match (path(from), path(to)) {
                (Some(f), Some(t)) => self.renaming(&f, &t, flags.exchange, probe),
                _ => Verdict::Apply,
            },
            Op::Write { path: w, .. }
            | Op::Truncate { path: w, .. }
            | Op::Fallocate { path: w, .. }
            | Op::SetAttr { path: w, .. }
            | Op::Fsync { path: Some(w) } => path(w).map_or(Verdict::Apply, |p| {
                let is_dir = self.is_dir_if_it_matters(&p, probe);
                if self.place(&p, is_dir, probe) == Place::Own { Verdict::Skip } else { Verdict::Apply }
            }),
            Op::Fsync { path: None } | Op::Point { .. } => Verdict::Apply,
        }
    }

    /// Whether `path` is a directory on the tree, looked up only when the rules judge a
    /// directory of that name otherwise than a file (`cache/`): most ops name selected
    /// files, and cost no lookup then.
    fn is_dir_if_it_matters(&self, path: &RelPath, probe: &dyn Fn(&RelPath) -> Option<bool>) -> bool {
        let (as_file, as_dir) =
            (self.selection.outside_at(path, false), self.selection.outside_at(path, true));
        as_file != as_dir && probe(path).unwrap_or(false)
    }

    /// Where `path` (a directory if `is_dir`) stands.
    fn place(&self, path: &RelPath, is_dir: bool, probe: &dyn Fn(&RelPath) -> Option<bool>) -> Place {
        let Some(top) = self.selection.outside_at(path, is_dir) else { return Place::Selected };
        if self.made.contains(&top) {
            Place::Made(top)
        } else if probe(&top).is_some() {
            Place::Own
        } else {
            Place::New(top)
        }
    }

    /// An op making `path`: skipped in the tree's own names; a name the stream makes outside
    /// the selection is recorded.
    fn making(&mut self, path: &RelPath, is_dir: bool, probe: &dyn Fn(&RelPath) -> Option<bool>) -> Verdict {
        match self.place(path, is_dir, probe) {
            Place::Own => Verdict::Skip,
            Place::New(top) => {
                // A name beneath a missing one fails on its own (no parent): nothing to record.
                if top == *path {
                    self.record(top);
                }
                Verdict::Apply
            }
            Place::Selected | Place::Made(_) => Verdict::Apply,
        }
    }

    /// An op removing `path`: skipped in the tree's own names; a name the stream made is
    /// forgotten.
    fn removing(
        &mut self,
        path: &RelPath,
        is_dir: bool,
        probe: &dyn Fn(&RelPath) -> Option<bool>,
    ) -> Verdict {
        match self.place(path, is_dir, probe) {
            Place::Own => Verdict::Skip,
            Place::Made(top) if top == *path => {
                self.forget_beneath(path);
                Verdict::Apply
            }
            _ => Verdict::Apply,
        }
    }

    /// A rename: the tree's own names are neither moved nor replaced; what the stream made
    /// follows the rename.
    fn renaming(
        &mut self,
        from: &RelPath,
        to: &RelPath,
        exchange: bool,
        probe: &dyn Fn(&RelPath) -> Option<bool>,
    ) -> Verdict {
        let is_dir = probe(from).or_else(|| probe(to)).unwrap_or(false);
        let (at_from, at_to) = (self.place(from, is_dir, probe), self.place(to, is_dir, probe));
        if at_from == Place::Own || (exchange && at_to == Place::Own) {
            return Verdict::Skip;
        }
        if at_to == Place::Own {
            // The stream's side moved the name onto one the tree keeps: the kept name stays,
            // and the old name goes as it went there (a directory, with what the tree may keep
            // inside it, stays too).
            if is_dir {
                return Verdict::Skip;
            }
            self.forget_beneath(from);
            return Verdict::Instead(Op::Unlink { path: from.to_wire() });
        }
        if exchange {
            self.swap(from, to);
            return Verdict::Apply;
        }
        self.forget_beneath(to);
        self.move_beneath(from, to);
        match at_to {
            Place::New(top) if top == *to => self.record(top),
            Place::Selected => self.forget(to),
            _ => {}
        }
        Verdict::Apply
    }

    fn record(&mut self, name: RelPath) {
        if self.made.len() < MAX_NAMES && self.made.insert(name) {
            self.unsaved = true;
        }
    }

    fn forget(&mut self, name: &RelPath) {
        self.unsaved |= self.made.remove(name);
    }

    /// The names at and beneath `dir`, taken out of the list.
    fn take_beneath(&mut self, dir: &RelPath) -> Vec<RelPath> {
        // Every name beneath `dir` shares its bytes as a prefix, and those sort together.
        let taken: Vec<RelPath> = self
            .made
            .range(dir.clone()..)
            .take_while(|n| n.as_bytes().starts_with(dir.as_bytes()))
            .filter(|n| n.starts_with(dir))
            .cloned()
            .collect();
        for n in &taken {
            self.made.remove(n);
        }
        self.unsaved |= !taken.is_empty();
        taken
    }

    fn forget_beneath(&mut self, dir: &RelPath) {
        self.take_beneath(dir);
    }

    fn move_beneath(&mut self, from: &RelPath, to: &RelPath) {
        for n in self.take_beneath(from) {
            if let Some(moved) = n.rebase(from, to) {
                self.record(moved);
            }
        }
    }

    fn swap(&mut self, a: &RelPath, b: &RelPath) {
        let (under_a, under_b) = (self.take_beneath(a), self.take_beneath(b));
        for (names, from, to) in [(under_a, a, b), (under_b, b, a)] {
            for n in names {
                if let Some(moved) = n.rebase(from, to) {
                    self.record(moved);
                }
            }
        }
    }

    /// Writes the list if it changed (aside, then renamed; not synced: see the module's
    /// notes on a lost update).
    pub fn save(&mut self) {
        let Some(file) = self.file.as_ref().filter(|_| self.unsaved) else { return };
        let names: Vec<WirePath> = self.made.iter().map(RelPath::to_wire).collect();
        let tmp = file.with_extension("json.tmp");
        let written = serde_json::to_vec(&names)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, file));
        match written {
            Ok(()) => self.unsaved = false,
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "cannot keep the names made outside the selection")
            }
        }
    }
}

/// What the tree beneath `root` holds at `path`, not following a symlink there: `None` when
/// nothing, `Some(true)` for a directory. A name that cannot be looked at counts as there
/// (so it is never taken for free).
fn kind_at(root: &Beneath, path: &RelPath) -> Option<bool> {
    let (dir, name) = match root.parent(path) {
        Ok(p) => p,
        Err(e) if gone(&e) => return None,
        Err(_) => return Some(false),
    };
    match rustix::fs::statat(&dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Some(st.st_mode & libc::S_IFMT == libc::S_IFDIR),
        Err(e) if gone(&e.into()) => None,
        Err(_) => Some(false),
    }
}

/// Whether `e` says the name is not there (it or a parent is missing, or a parent is not a
/// directory).
fn gone(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}

#[cfg(test)]
mod tests;
