//! Replaying an op right after it was applied changes nothing, for every kind of op.
//!
//! A killed target process may have applied the op in flight without recording it in the
//! progress marker; the restarted process applies it a second time. Each scenario below is a
//! short sequence around one op, applied to three replicas: once; with the op replayed after
//! a simulated kill (progress marker one short, replica reopened); and with the op applied
//! twice in a row by [`apply_op`] in one process. All three trees must be identical, by the
//! same comparison the end-to-end tests use (names, types, content, modes, owners, times,
//! xattrs, hard links).

use std::path::Path;

use doppel_apply::ops::{OpenFile, apply_op};
use doppel_apply::state::{ExchangeNote, Progress};
use doppel_apply::{Outcome, Replica};
use doppel_fs::Beneath;
use doppel_proto::{Attrs, Op, OpRecord, RenameFlags, Timestamp, WirePath, Xattr};
use doppel_testkit::{Compare, compare_trees, noise, require, snapshot};

fn w(s: &str) -> WirePath {
    WirePath(s.as_bytes().to_vec())
}

fn create(p: &str) -> Op {
    Op::Create { path: w(p), mode: 0o644 }
}

fn mkdir(p: &str) -> Op {
    Op::Mkdir { path: w(p), mode: 0o755 }
}

fn write(p: &str, offset: u64, data: &[u8]) -> Op {
    Op::Write { path: w(p), offset, data: data.to_vec() }
}

fn rename(from: &str, to: &str, noreplace: bool, exchange: bool) -> Op {
    Op::Rename { from: w(from), to: w(to), flags: RenameFlags { noreplace, exchange } }
}

fn setattr(p: &str, attrs: Attrs) -> Op {
    Op::SetAttr { path: w(p), attrs }
}

fn xattrs(pairs: &[(&str, &str)]) -> Attrs {
    let x = pairs.iter().map(|(n, v)| Xattr { name: n.as_bytes().to_vec(), value: v.as_bytes().to_vec() });
    Attrs { xattrs: Some(x.collect()), ..Attrs::default() }
}

fn fallocate(p: &str, mode: i32, offset: u64, len: u64) -> Op {
    Op::Fallocate { path: w(p), mode: mode as u32, offset, len }
}

/// One op to replay, with what comes before and after it.
struct Scenario {
    name: &'static str,
    before: Vec<Op>,
    op: Op,
    after: Vec<Op>,
    /// Names whose times the scenario sets itself (the others are settled to one fixed time
    /// at the end, since creating and writing stamp the wall clock, which differs between
    /// replicas anyway).
    own_times: &'static [&'static str],
}

fn sc(name: &'static str, before: Vec<Op>, op: Op, after: Vec<Op>) -> Scenario {
    Scenario { name, before, op, after, own_times: &[] }
}

fn scenarios() -> Vec<Scenario> {
    let t = |secs| Some(Timestamp { secs, nanos: 42 });
    let data = noise(1, 64 << 10);
    let with_data = |p: &'static str| vec![create(p), write(p, 0, &data)];
    vec![
        sc(
            "create",
            vec![mkdir("d")],
            Op::Create { path: w("d/f"), mode: 0o640 },
            vec![write("d/f", 0, b"x")],
        ),
        sc("create keeps the file", vec![], create("f"), vec![write("f", 0, b"data"), create("f")]),
        sc("mkdir", vec![], Op::Mkdir { path: w("d"), mode: 0o750 }, vec![create("d/f")]),
        sc("symlink", vec![], Op::Symlink { path: w("l"), target: b"../x".to_vec() }, vec![]),
        sc(
            "symlink replacing a file",
            vec![create("l")],
            Op::Symlink { path: w("l"), target: b"t".to_vec() },
            vec![],
        ),
        sc(
            "link",
            with_data("f"),
            Op::Link { path: w("g"), existing: w("f") },
            vec![write("g", 0, b"through g")],
        ),
        sc(
            "link replacing another file",
            [with_data("f"), vec![create("g")]].concat(),
            Op::Link { path: w("g"), existing: w("f") },
            vec![],
        ),
        sc(
            "rename",
            [with_data("a"), vec![create("b"), write("b", 0, b"B")]].concat(),
            rename("a", "b", false, false),
            vec![create("a"), write("a", 0, b"new a")],
        ),
        sc("rename noreplace", with_data("a"), rename("a", "c", true, false), vec![write("c", 1, b"c")]),
        sc(
            "rename of a directory",
            vec![mkdir("d"), create("d/f"), mkdir("e")],
            rename("d", "e/d2", false, false),
            vec![create("e/d2/g")],
        ),
        sc(
            "rename exchange of two files",
            [with_data("a"), vec![create("b"), write("b", 0, b"B")]].concat(),
            rename("a", "b", false, true),
            vec![write("a", 0, b"written to the old b")],
        ),
        sc(
            "rename exchange of a file and a directory",
            vec![mkdir("d"), create("d/in"), create("f"), write("f", 0, b"F")],
            rename("d", "f", false, true),
            vec![create("f/more"), write("d", 0, b"still F")],
        ),
        sc(
            "rename exchange across directories",
            vec![mkdir("x"), mkdir("y"), create("x/a"), mkdir("y/b"), create("y/b/c")],
            rename("x/a", "y/b", false, true),
            vec![create("x/a/d")],
        ),
        sc("unlink", with_data("f"), Op::Unlink { path: w("f") }, vec![create("f")]),
        sc(
            "unlink of one of two names",
            [with_data("f"), vec![Op::Link { path: w("g"), existing: w("f") }]].concat(),
            Op::Unlink { path: w("g") },
            vec![],
        ),
        sc("rmdir", vec![mkdir("d"), mkdir("d/e")], Op::Rmdir { path: w("d/e") }, vec![]),
        sc("write", vec![create("f")], write("f", 3, b"hello"), vec![write("f", 5, b"LLO")]),
        sc("write past the end", with_data("f"), write("f", 100 << 10, b"far"), vec![]),
        sc(
            "truncate shrinking",
            with_data("f"),
            Op::Truncate { path: w("f"), size: 10 },
            vec![write("f", 20, b"x")],
        ),
        sc("truncate growing", with_data("f"), Op::Truncate { path: w("f"), size: 1 << 20 }, vec![]),
        sc(
            "setattr mode",
            vec![mkdir("d"), create("d/f")],
            setattr("d/f", Attrs { mode: Some(0o4751), ..Attrs::default() }),
            vec![setattr("d", Attrs { mode: Some(0o700), ..Attrs::default() })],
        ),
        Scenario {
            own_times: &["f", "d", "l"],
            ..sc(
                "setattr times",
                vec![create("f"), mkdir("d"), Op::Symlink { path: w("l"), target: b"f".to_vec() }],
                setattr("f", Attrs { atime: t(1_000), mtime: t(2_000_000_000), ..Attrs::default() }),
                vec![
                    setattr("d", Attrs { mtime: t(5), ..Attrs::default() }),
                    setattr("l", Attrs { mtime: t(7), ..Attrs::default() }),
                ],
            )
        },
        sc(
            "setattr xattrs",
            vec![mkdir("d"), create("f"), setattr("f", xattrs(&[("user.a", "1"), ("user.b", "2")]))],
            setattr("f", xattrs(&[("user.b", "two"), ("user.c", "3")])),
            vec![setattr("d", xattrs(&[("user.d", "")])), setattr("", xattrs(&[("user.root", "r")]))],
        ),
        sc(
            "setattr everything at once",
            vec![create("f"), write("f", 0, b"x")],
            setattr(
                "f",
                Attrs {
                    mode: Some(0o2640),
                    uid: Some(4321),
                    gid: Some(4321),
                    atime: None,
                    mtime: None,
                    xattrs: xattrs(&[("user.k", "v")]).xattrs,
                },
            ),
            vec![],
        ),
        sc("fsync", with_data("f"), Op::Fsync { path: Some(w("f")) }, vec![write("f", 0, b"after")]),
        sc(
            "bookmark",
            with_data("f"),
            Op::Point { kind: doppel_proto::PointKind::Bookmark("b".into()) },
            vec![write("f", 0, b"after")],
        ),
        sc("mknod fifo", vec![], Op::Mknod { path: w("p"), mode: libc::S_IFIFO | 0o600, rdev: 0 }, vec![]),
        sc("mknod socket", vec![], Op::Mknod { path: w("s"), mode: libc::S_IFSOCK | 0o644, rdev: 0 }, vec![]),
        sc(
            "fallocate punch hole",
            with_data("f"),
            fallocate("f", libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 4096, 8192),
            vec![],
        ),
        sc(
            "fallocate zero range",
            with_data("f"),
            fallocate("f", libc::FALLOC_FL_ZERO_RANGE, 100, 50_000),
            vec![],
        ),
        sc("fallocate growing", with_data("f"), fallocate("f", 0, 60_000, 100_000), vec![]),
        sc(
            "fallocate keep size",
            with_data("f"),
            fallocate("f", libc::FALLOC_FL_KEEP_SIZE, 0, 1 << 20),
            vec![write("f", 0, b"x")],
        ),
    ]
}

/// A small index per op kind: the match is exhaustive, so a new kind of op does not compile
/// until it has a place here (and, by the coverage check, a scenario).
fn kind(op: &Op) -> usize {
    match op {
        Op::Create { .. } => 0,
        Op::Mkdir { .. } => 1,
        Op::Symlink { .. } => 2,
        Op::Link { .. } => 3,
        Op::Rename { flags, .. } => match (flags.noreplace, flags.exchange) {
            (false, false) => 4,
            (true, _) => 5,
            (false, true) => 6,
        },
        Op::Unlink { .. } => 7,
        Op::Rmdir { .. } => 8,
        Op::Write { .. } => 9,
        Op::Truncate { .. } => 10,
        Op::SetAttr { .. } => 11,
        Op::Fsync { .. } => 12,
        Op::Mknod { .. } => 13,
        Op::Fallocate { .. } => 14,
        Op::Point { .. } => 15,
    }
}
const KINDS: usize = 16;

/// How the scenario's op is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Once.
    Once,
    /// Applied, then the process "killed" before its progress marker recorded the op: the
    /// replica is reopened one op short and the op arrives again.
    ReplayedAfterKill,
    /// [`apply_op`] twice in a row in one process.
    Twice,
}

/// Applies op records to one replica directory in one [`Mode`].
struct Run {
    root: std::path::PathBuf,
    state: std::path::PathBuf,
    replica: Option<Replica>,
    direct: Option<(Beneath, OpenFile, Option<ExchangeNote>)>,
    seq: u64,
}

impl Run {
    fn new(dir: &Path, mode: Mode) -> Run {
        let root = dir.join(format!("{mode:?}/tree"));
        let state = dir.join(format!("{mode:?}/state"));
        let replica = Replica::open(&root, &state).unwrap();
        let direct =
            (mode == Mode::Twice).then(|| (Beneath::open(&root).unwrap(), OpenFile::default(), None));
        Run { root, state, replica: Some(replica), direct, seq: 0 }
    }

    /// Applies `op` as the next record; `Err` with the outcome if it was not applied.
    fn apply(&mut self, op: &Op) -> Result<(), String> {
        self.seq += 1;
        let seq = self.seq;
        if let Some((root, open, notes)) = &mut self.direct {
            return apply_op(root, open, notes, seq, op).map_err(|e| e.to_string());
        }
        let rec = OpRecord { seq, time_us: 0, op: op.clone() };
        match self.replica.as_mut().expect("open").apply(&rec).unwrap() {
            Outcome::Applied => Ok(()),
            other => Err(format!("{other:?}")),
        }
    }

    /// Applies the op again the way `mode` replays it.
    fn replay(&mut self, op: &Op, mode: Mode) -> Result<(), String> {
        match mode {
            Mode::Once => Ok(()),
            Mode::Twice => {
                self.seq -= 1;
                self.apply(op)
            }
            Mode::ReplayedAfterKill => {
                drop(self.replica.take());
                let (mut progress, seen) = Progress::open(&self.state).unwrap();
                assert_eq!(seen, Some(self.seq), "the marker recorded the op");
                progress.record(self.seq - 1).unwrap();
                drop(progress);
                let replica = Replica::open(&self.root, &self.state).unwrap();
                assert_eq!(replica.applied(), self.seq - 1, "reopened one op short");
                self.replica = Some(replica);
                self.seq -= 1;
                self.apply(op)
            }
        }
    }
}

/// Sets the times of every name of `names` not in `own` to one fixed value, through ops.
fn settle(run: &mut Run, names: &[String], own: &[&str]) {
    let fixed = Some(Timestamp { secs: 1_500_000_000, nanos: 0 });
    for n in names.iter().filter(|n| !own.contains(&n.as_str())) {
        let p = if n == "." { "" } else { n.as_str() };
        let op = setattr(p, Attrs { atime: fixed, mtime: fixed, ..Attrs::default() });
        run.apply(&op).unwrap_or_else(|e| panic!("settling {n}: {e}"));
    }
}

fn run_scenario(s: &Scenario) {
    let dir = tempfile::tempdir().unwrap();
    let modes = [Mode::Once, Mode::ReplayedAfterKill, Mode::Twice];
    let mut runs: Vec<Run> = modes.iter().map(|&m| Run::new(dir.path(), m)).collect();
    for (run, mode) in runs.iter_mut().zip(modes) {
        for op in &s.before {
            run.apply(op).unwrap_or_else(|e| panic!("{}: setup {op:?}: {e}", s.name));
        }
        run.apply(&s.op).unwrap_or_else(|e| panic!("{}: {:?}: {e}", s.name, s.op));
        run.replay(&s.op, mode).unwrap_or_else(|e| panic!("{}: {mode:?}: replayed {:?}: {e}", s.name, s.op));
        for op in &s.after {
            run.apply(op).unwrap_or_else(|e| panic!("{}: {mode:?}: after the replay, {op:?}: {e}", s.name));
        }
    }
    let names: Vec<String> = snapshot(&runs[0].root, Compare::default()).into_keys().collect();
    for run in &mut runs {
        settle(run, &names, s.own_times);
    }
    for (run, mode) in runs.iter().zip(modes).skip(1) {
        if let Err(diff) = compare_trees(&runs[0].root, &run.root, Compare::default()) {
            panic!("{}: {mode:?} differs from applying {:?} once:\n{diff}", s.name, s.op);
        }
    }
}

#[test]
fn every_kind_of_op_has_a_scenario() {
    let mut seen = [false; KINDS];
    for s in scenarios() {
        seen[kind(&s.op)] = true;
    }
    let missing: Vec<usize> = (0..KINDS).filter(|&k| !seen[k]).collect();
    assert!(missing.is_empty(), "op kinds without a replay scenario: {missing:?}");
}

#[test]
fn every_op_replayed_right_after_it_was_applied_changes_nothing() {
    let root = rustix::process::geteuid().is_root();
    for s in scenarios() {
        let owners = matches!(&s.op, Op::SetAttr { attrs, .. } if attrs.uid.is_some());
        if owners && !require(root, "a replayed chown needs root") {
            continue;
        }
        run_scenario(&s);
    }
}

/// The case the note exists for: without it a replayed exchange swaps the names back.
#[test]
fn a_replayed_exchange_leaves_the_names_swapped() {
    let s = &scenarios().into_iter().find(|s| s.name == "rename exchange of two files").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut run = Run::new(dir.path(), Mode::ReplayedAfterKill);
    for op in &s.before {
        run.apply(op).unwrap();
    }
    run.apply(&s.op).unwrap();
    run.replay(&s.op, Mode::ReplayedAfterKill).unwrap();
    assert_eq!(std::fs::read(run.root.join("a")).unwrap(), b"B", "a holds b's old content");
    assert!(std::fs::read(run.root.join("b")).unwrap() == noise(1, 64 << 10), "b holds a's old content");
}
