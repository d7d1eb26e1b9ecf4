use std::cell::RefCell;
use std::collections::BTreeMap;

use doppel_proto::{Attrs, RenameFlags};

use super::*;

fn w(s: &str) -> WirePath {
    WirePath(s.as_bytes().to_vec())
}

/// A tree as a map of names to "is a directory", changed by hand as ops are applied.
struct Tree(RefCell<BTreeMap<String, bool>>);

impl Tree {
    fn new(names: &[(&str, bool)]) -> Tree {
        Tree(RefCell::new(names.iter().map(|(n, d)| (n.to_string(), *d)).collect()))
    }

    fn set(&self, name: &str, is_dir: Option<bool>) {
        match is_dir {
            Some(d) => self.0.borrow_mut().insert(name.to_string(), d),
            None => self.0.borrow_mut().remove(name),
        };
    }

    fn judge(&self, o: &mut Outside, op: Op) -> Verdict {
        o.judge_with(&op, &|p| self.0.borrow().get(&p.to_string()).copied())
    }
}

fn rules() -> Selection {
    Selection::new(&[], &["*.tmp".into(), "cache/".into()]).unwrap()
}

fn mv(from: &str, to: &str) -> Op {
    Op::Rename { from: w(from), to: w(to), flags: RenameFlags::default() }
}

fn write(path: &str) -> Op {
    Op::Write { path: w(path), offset: 0, data: b"x".to_vec() }
}

/// The tree's own names outside the selection are never removed, replaced, changed, moved or
/// written into; selected names are the stream's as always.
#[test]
fn the_trees_own_names_outside_the_selection_are_left_alone() {
    let t = Tree::new(&[("scratch.tmp", false), ("cache", true), ("cache/blob", false), ("d", true)]);
    let mut o = Outside { selection: rules(), ..Outside::default() };
    for op in [
        Op::Unlink { path: w("scratch.tmp") },
        write("scratch.tmp"),
        Op::Truncate { path: w("scratch.tmp"), size: 0 },
        Op::Create { path: w("scratch.tmp"), mode: 0o644 },
        Op::Symlink { path: w("scratch.tmp"), target: b"elsewhere".to_vec() },
        Op::SetAttr { path: w("cache"), attrs: Attrs::default() },
        Op::Rmdir { path: w("cache") },
        Op::Unlink { path: w("cache/blob") },
        Op::Create { path: w("cache/new"), mode: 0o644 },
        Op::Link { path: w("d/hard"), existing: w("scratch.tmp") },
        mv("scratch.tmp", "d/kept"),
        mv("d", "cache"),
        mv("cache/blob", "d/blob"),
        Op::Rename {
            from: w("d/a"),
            to: w("scratch.tmp"),
            flags: RenameFlags { exchange: true, ..Default::default() },
        },
    ] {
        assert_eq!(t.judge(&mut o, op.clone()), Verdict::Skip, "{op:?}");
    }
    // A file moved onto a kept name: the kept one stays, the old name goes.
    assert_eq!(
        t.judge(&mut o, mv("d/report", "scratch.tmp")),
        Verdict::Instead(Op::Unlink { path: w("d/report") })
    );
    for op in [Op::Unlink { path: w("d/a") }, Op::Rmdir { path: w("d") }, write("d/a"), mv("d", "e")] {
        assert_eq!(t.judge(&mut o, op.clone()), Verdict::Apply, "{op:?}");
    }
    assert!(o.made.is_empty());
}

/// Names the stream makes outside the selection are its own: written, renamed into the
/// selection, removed; once removed, a name of the tree's in their place is left alone.
#[test]
fn names_the_stream_makes_outside_the_selection_are_the_streams() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tree::new(&[("d", true)]);
    let mut o = Outside::load(dir.path(), rules());
    assert_eq!(t.judge(&mut o, Op::Create { path: w("report.tmp"), mode: 0o644 }), Verdict::Apply);
    t.set("report.tmp", Some(false));
    assert_eq!(t.judge(&mut o, write("report.tmp")), Verdict::Apply);
    assert_eq!(t.judge(&mut o, mv("report.tmp", "report")), Verdict::Apply);
    t.set("report.tmp", None);
    t.set("report", Some(false));
    assert!(o.made.is_empty(), "a name renamed into the selection is no longer outside it");
    // A directory made outside, with what the stream puts in it, renamed within.
    assert_eq!(t.judge(&mut o, Op::Mkdir { path: w("d/build.tmp"), mode: 0o755 }), Verdict::Apply);
    t.set("d/build.tmp", Some(true));
    assert_eq!(t.judge(&mut o, Op::Create { path: w("d/build.tmp/out"), mode: 0o644 }), Verdict::Apply);
    t.set("d/build.tmp/out", Some(false));
    assert_eq!(t.judge(&mut o, mv("d", "e")), Verdict::Apply);
    t.set("e/build.tmp", Some(true));
    assert_eq!(o.made.iter().map(|n| n.to_string()).collect::<Vec<_>>(), ["e/build.tmp"]);
    assert_eq!(t.judge(&mut o, write("e/build.tmp/out")), Verdict::Apply);
    // Kept across a restart (written at a commit).
    o.save();
    let mut o = Outside::load(dir.path(), rules());
    assert_eq!(t.judge(&mut o, Op::Unlink { path: w("e/build.tmp/out") }), Verdict::Apply);
    assert_eq!(t.judge(&mut o, Op::Rmdir { path: w("e/build.tmp") }), Verdict::Apply);
    assert!(o.made.is_empty());
    // Gone from the stream's list: a name of the tree's own in its place is kept.
    assert_eq!(t.judge(&mut o, Op::Unlink { path: w("e/build.tmp") }), Verdict::Skip);
}

/// Without rules nothing is judged (and no list is read or written).
#[test]
fn without_rules_every_op_applies() {
    let t = Tree::new(&[("x.tmp", false)]);
    let mut o = Outside::none();
    assert!(o.keeps_nothing());
    assert_eq!(t.judge(&mut o, Op::Unlink { path: w("x.tmp") }), Verdict::Apply);
}
