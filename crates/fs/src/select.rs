//! Include and exclude rules, in gitignore syntax.
//!
//! Exclude rules work exactly as a `.gitignore` at the job root would (`*.tmp`, `cache/`,
//! `/build`, `!keep.tmp`, `**/logs`). Include rules, when there are any, restrict the job to
//! files that match one of them or lie beneath a directory that does (`*.db`, `vm-images/`).
//! Directories are kept as containers unless excluded, so an include rule never needs its
//! parent directories spelled out. Excludes win over includes.

use doppel_proto::RelPath;
use ignore::gitignore::{Gitignore, GitignoreBuilder};

/// A rule that cannot be parsed.
#[derive(Debug, thiserror::Error)]
#[error("bad {kind} rule {rule:?}: {reason}")]
pub struct SelectionError {
    /// `include` or `exclude`.
    pub kind: &'static str,
    /// The rule as written.
    pub rule: String,
    /// The parser's complaint.
    pub reason: String,
}

/// Which entries of a job tree are protected.
#[derive(Debug, Clone)]
pub struct Selection {
    exclude: Gitignore,
    include: Option<Gitignore>,
}

impl Default for Selection {
    fn default() -> Self {
        Selection::all()
    }
}

fn build(kind: &'static str, rules: &[String]) -> Result<Gitignore, SelectionError> {
    let mut b = GitignoreBuilder::new("");
    for rule in rules {
        b.add_line(None, rule).map_err(|e| SelectionError {
            kind,
            rule: rule.clone(),
            reason: e.to_string(),
        })?;
    }
    b.build().map_err(|e| SelectionError { kind, rule: rules.join(", "), reason: e.to_string() })
}

impl Selection {
    /// Everything.
    pub fn all() -> Selection {
        Selection { exclude: Gitignore::empty(), include: None }
    }

    /// Builds from rule lists (each rule one gitignore line).
    pub fn new(include: &[String], exclude: &[String]) -> Result<Selection, SelectionError> {
        let include = if include.is_empty() { None } else { Some(build("include", include)?) };
        Ok(Selection { exclude: build("exclude", exclude)?, include })
    }

    /// Whether `path` itself matches an exclude rule (its parents are not considered): used by
    /// walks, which never enter an excluded directory in the first place.
    pub fn excluded_here(&self, path: &RelPath, is_dir: bool) -> bool {
        !path.is_root() && self.exclude.matched(path.as_path(), is_dir).is_ignore()
    }

    /// Whether `path` is protected, considering its parents too: used for single paths that
    /// arrive in events.
    pub fn selects(&self, path: &RelPath, is_dir: bool) -> bool {
        if path.is_root() {
            return true;
        }
        if self.exclude.matched_path_or_any_parents(path.as_path(), is_dir).is_ignore() {
            return false;
        }
        self.included(path, is_dir)
    }

    /// The include half of [`Selection::selects`] (walks check excludes level by level).
    pub fn included(&self, path: &RelPath, is_dir: bool) -> bool {
        match &self.include {
            None => true,
            Some(_) if is_dir => true,
            Some(inc) => inc.matched_path_or_any_parents(path.as_path(), false).is_ignore(),
        }
    }

    /// Whether there are no rules: everything is selected (callers skip all checks then).
    pub fn selects_everything(&self) -> bool {
        self.exclude.is_empty() && self.include.is_none()
    }

    /// The shallowest of `path` and its ancestors that the rules leave out, judged level by
    /// level as a walk judges them (ancestors are directories; `is_dir` says what `path` is),
    /// or `None` when `path` is selected. A tree that keeps names out of the job, such as a
    /// source receiving its replica back, owns everything beneath that name.
    pub fn outside_at(&self, path: &RelPath, is_dir: bool) -> Option<RelPath> {
        if path.is_root() || self.selects_everything() {
            return None;
        }
        let mut at = RelPath::root();
        for name in path.components() {
            at = at.join(name).ok()?;
            if self.excluded_here(&at, is_dir || at != *path) {
                return Some(at);
            }
        }
        (!self.included(path, is_dir)).then(|| path.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn gitignore_semantics() {
        let s = Selection::new(&[], &["*.tmp".into(), "cache/".into(), "/build".into(), "!keep.tmp".into()])
            .unwrap();
        assert!(!s.selects(&p("a/b.tmp"), false));
        assert!(s.selects(&p("a/keep.tmp"), false));
        assert!(!s.selects(&p("x/cache"), true));
        assert!(!s.selects(&p("x/cache/deep/file"), false));
        assert!(s.selects(&p("x/cache"), false), "cache/ matches directories only");
        assert!(!s.selects(&p("build"), true));
        assert!(s.selects(&p("src/build"), true), "/build is anchored at the root");
        assert!(s.selects(&RelPath::root(), true));
    }

    #[test]
    fn includes_restrict_files_not_directories() {
        let s = Selection::new(&["*.db".into(), "images/".into()], &["old.db".into()]).unwrap();
        assert!(s.selects(&p("x/y/data.db"), false));
        assert!(!s.selects(&p("x/y/data.txt"), false));
        assert!(s.selects(&p("x/y"), true));
        assert!(s.selects(&p("images/vm/disk.raw"), false));
        assert!(!s.selects(&p("x/old.db"), false), "excludes win");
        let e = Selection::new(&[], &["{a,b".into()]).unwrap_err();
        assert!(e.to_string().contains("{a,b"), "{e}");
    }

    #[test]
    fn outside_at_names_the_shallowest_name_left_out() {
        let s = Selection::new(&["*.db".into()], &["*.tmp".into(), "cache/".into()]).unwrap();
        let at = |path: &str, is_dir| s.outside_at(&p(path), is_dir).map(|o| o.to_string());
        assert_eq!(at("x/cache/y.tmp/z.db", false).as_deref(), Some("x/cache"));
        assert_eq!(at("x/y.tmp", true).as_deref(), Some("x/y.tmp"));
        assert_eq!(at("x/cache", false).as_deref(), Some("x/cache"), "not included");
        assert_eq!(at("x/cache", true).as_deref(), Some("x/cache"), "excluded");
        assert_eq!(at("x/data.db", false), None);
        assert_eq!(at("x/notes", true), None, "directories are containers");
        assert_eq!(s.outside_at(&RelPath::root(), true), None);
        assert!(Selection::all().selects_everything() && !s.selects_everything());
        assert_eq!(Selection::all().outside_at(&p("a.tmp"), false), None);
    }
}
