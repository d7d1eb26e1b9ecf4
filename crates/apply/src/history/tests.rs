use std::collections::BTreeMap;
use std::path::PathBuf;

use doppel_proto::{Attrs, Op, OpRecord, RenameFlags, Timestamp, WirePath, Xattr};
use doppel_testkit::{Compare, Node, diff_snapshots, snapshot};

use super::restore::{Restored, measure, restore};
use super::view::PointView;
use super::{attic_of, dir_of};
use crate::Replica;

fn w(s: &str) -> WirePath {
    WirePath(s.as_bytes().to_vec())
}

struct Fixture {
    dir: tempfile::TempDir,
    root: PathBuf,
    state: PathBuf,
    replica: Replica,
    seq: u64,
    /// Capture time of op 0 (µs since the epoch): ops are 1 ms apart after it.
    base: u64,
    /// The tree after each op (index = point).
    shots: Vec<BTreeMap<String, Node>>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("replicas/src/job");
        let state = dir.path().join("state/src/job");
        let replica = Replica::open(&root, &state).unwrap();
        let shots = vec![snapshot(&root, Compare::default())];
        let base = super::super::replica::now_us();
        Fixture { dir, root, state, replica, seq: 0, base, shots }
    }

    fn apply(&mut self, op: Op) {
        self.seq += 1;
        let out = self
            .replica
            .apply(&OpRecord { seq: self.seq, time_us: self.base + self.seq * 1000, op })
            .unwrap();
        assert!(matches!(out, crate::Outcome::Applied), "op {}: {out:?}", self.seq);
        self.shots.push(snapshot(&self.root, Compare::default()));
    }

    fn write(&mut self, path: &str, offset: u64, data: &[u8]) {
        self.apply(Op::Write { path: w(path), offset, data: data.to_vec() });
    }

    fn mtime(&mut self, path: &str, secs: i64) {
        let t = Some(Timestamp { secs, nanos: 7 });
        self.apply(Op::SetAttr { path: w(path), attrs: Attrs { mtime: t, atime: t, ..Attrs::default() } });
    }

    fn restore_at(&self, point: u64, paths: &[&str]) -> (tempfile::TempDir, PathBuf) {
        let out = tempfile::tempdir_in(self.dir.path()).unwrap();
        let to = out.path().join("r");
        std::fs::create_dir(&to).unwrap();
        let mut view = PointView::open(&self.root, &dir_of(&self.state), point, self.seq).unwrap();
        let paths: Vec<Vec<u8>> = paths.iter().map(|p| p.as_bytes().to_vec()).collect();
        // The total a progress display gets first is exactly what the restore then does.
        let total = measure(&mut view, &paths).unwrap();
        let mut last = Restored::default();
        let done = restore(&mut view, &paths, &to, &mut |r| {
            assert!(r.objects >= last.objects && r.read >= last.read && r.read <= total.read);
            last = r;
        })
        .unwrap();
        assert_eq!((done.objects, done.read), (total.objects, total.read), "point {point} {paths:?}");
        assert!(done.bytes <= total.bytes);
        (out, to)
    }

    /// A workload touching every kind of op, with old content worth getting back.
    fn workload(&mut self) {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        self.apply(Op::Mkdir { path: w("d"), mode: 0o755 });
        self.apply(Op::Create { path: w("d/a"), mode: 0o644 });
        self.write("d/a", 0, &big);
        self.mtime("d/a", 1_000_000);
        self.apply(Op::Create { path: w("b"), mode: 0o600 });
        self.write("b", 0, b"version one of b");
        self.apply(Op::Link { path: w("d/a-link"), existing: w("d/a") });
        self.apply(Op::Symlink { path: w("s"), target: b"d/a".to_vec() });
        self.mtime("d", 1_000_100);
        self.mtime("", 1_000_200);
        // Ransomware: overwrite in place, rename, remove.
        self.write("d/a", 100, &vec![0xEE; 200_000]);
        self.write("b", 0, b"ENCRYPTED!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
        self.apply(Op::Rename { from: w("b"), to: w("b.locked"), flags: RenameFlags::default() });
        self.apply(Op::Truncate { path: w("d/a"), size: 10 });
        self.apply(Op::Unlink { path: w("d/a-link") });
        self.apply(Op::SetAttr {
            path: w("d/a"),
            attrs: Attrs {
                mode: Some(0o600),
                xattrs: Some(vec![Xattr { name: b"user.k".to_vec(), value: b"v".to_vec() }]),
                ..Attrs::default()
            },
        });
        self.apply(Op::Symlink { path: w("s"), target: b"elsewhere".to_vec() });
        self.apply(Op::Mkdir { path: w("e"), mode: 0o700 });
        self.apply(Op::Create { path: w("e/x"), mode: 0o644 });
        self.write("e/x", 0, b"x");
        self.apply(Op::Rename { from: w("e/x"), to: w("d/a"), flags: RenameFlags::default() });
        self.apply(Op::Rename {
            from: w("d"),
            to: w("e"),
            flags: RenameFlags { exchange: true, ..RenameFlags::default() },
        });
        self.apply(Op::Unlink { path: w("e/a") });
        self.apply(Op::Rmdir { path: w("d") });
        self.apply(Op::Fallocate {
            path: w("b.locked"),
            mode: (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u32,
            offset: 0,
            len: 8,
        });
        self.write("b.locked", 1 << 20, b"far");
    }
}

#[test]
fn every_point_of_a_workload_restores_exactly_while_the_replica_stays_at_now() {
    let mut f = Fixture::new();
    f.workload();
    let now = snapshot(&f.root, Compare::default());
    for point in 0..=f.seq {
        let (_keep, to) = f.restore_at(point, &[]);
        let got = snapshot(&to, Compare::default());
        let d = diff_snapshots(&f.shots[point as usize], &got);
        assert!(d.is_empty(), "point {point}:\n{d}");
    }
    assert_eq!(snapshot(&f.root, Compare::default()), now, "restores changed the replica");
}

#[test]
fn every_point_restores_exactly_when_the_journal_is_many_segments() {
    let mut f = Fixture::new();
    // Segments of a few sets each: views skip the ones wholly before their point.
    f.replica.history().unwrap().journal().set_segment_bytes(4096);
    f.workload();
    assert!(super::journal::list_segments(&dir_of(&f.state)).unwrap().len() > 5);
    for point in 0..=f.seq {
        let (_keep, to) = f.restore_at(point, &[]);
        let d = diff_snapshots(&f.shots[point as usize], &snapshot(&to, Compare::default()));
        assert!(d.is_empty(), "point {point}:\n{d}");
    }
    // A rollback across segments too.
    f.replica.commit().unwrap();
    let attic = attic_of(&f.root, &f.state);
    super::rollback::roll_back(f.replica.root(), &dir_of(&f.state), &attic, 9).unwrap();
    let d = diff_snapshots(&f.shots[9], &snapshot(&f.root, Compare::default()));
    assert!(d.is_empty(), "{d}");
}

#[test]
fn one_path_restores_alone_with_its_old_bytes_under_its_old_name() {
    let mut f = Fixture::new();
    f.workload();
    // Point 10: before the ransomware, b held "version one of b".
    let (_keep, to) = f.restore_at(10, &["b"]);
    assert_eq!(std::fs::read(to.join("b")).unwrap(), b"version one of b");
    let names: Vec<_> = std::fs::read_dir(&to).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("b")]);
    let (_keep, to) = f.restore_at(10, &["d/a"]);
    // Restored alone, so without the other name it had.
    let want = Node { links: Vec::new(), ..f.shots[10]["d/a"].clone() };
    assert_eq!(snapshot(&to.join("d/a"), Compare::default())["."], want);
    let mut view = PointView::open(&f.root, &dir_of(&f.state), 10, f.seq).unwrap();
    let err = restore(&mut view, &[b"b.locked".to_vec()], &to, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("b.locked did not exist at point 10"), "{err}");
}

#[test]
fn a_point_outside_the_window_is_refused_naming_the_window() {
    let mut f = Fixture::new();
    f.workload();
    let err = PointView::open(&f.root, &dir_of(&f.state), f.seq + 1, f.seq).err().unwrap();
    assert!(err.to_string().contains(&format!("points 0 to {}", f.seq)), "{err}");
}

#[test]
fn a_view_opened_before_more_ops_still_shows_its_point() {
    let mut f = Fixture::new();
    f.workload();
    let point = f.seq;
    let want = f.shots[point as usize].clone();
    let mut view = PointView::open(&f.root, &dir_of(&f.state), point, f.seq).unwrap();
    // More ops after the view was opened: it must take in their sets.
    f.write("b.locked", 0, b"later");
    f.apply(Op::Rename { from: w("e"), to: w("e2"), flags: RenameFlags::default() });
    f.apply(Op::Unlink { path: w("b.locked") });
    let out = tempfile::tempdir_in(f.dir.path()).unwrap();
    restore(&mut view, &[], out.path(), &mut |_| {}).unwrap();
    let d = diff_snapshots(&want, &snapshot(out.path(), Compare::default()));
    assert!(d.is_empty(), "{d}");
}

#[test]
fn rollback_takes_the_replica_itself_back_and_keeps_the_history_before_the_point() {
    let mut f = Fixture::new();
    f.workload();
    let point = 12;
    f.replica.commit().unwrap();
    let attic = attic_of(&f.root, &f.state);
    let undone = super::rollback::roll_back(f.replica.root(), &dir_of(&f.state), &attic, point).unwrap();
    assert_eq!(undone, f.seq - point);
    let d = diff_snapshots(&f.shots[point as usize], &snapshot(&f.root, Compare::default()));
    assert!(d.is_empty(), "{d}");
    // Points before it are still there.
    let (_keep, to) = f.restore_at(5, &[]);
    let d = diff_snapshots(&f.shots[5], &snapshot(&to, Compare::default()));
    assert!(d.is_empty(), "{d}");
}

#[test]
fn a_replayed_op_reuses_its_set_and_a_torn_tail_is_cut() {
    let mut f = Fixture::new();
    f.workload();
    let dir = dir_of(&f.state);
    let before = super::view::summary(&dir, &attic_of(&f.root, &f.state)).unwrap();
    // The last op again, as after a kill between its set and its progress marker.
    let root = doppel_fs::Beneath::open(&f.root).unwrap();
    let op = Op::Write { path: w("b.locked"), offset: 1 << 20, data: b"far".to_vec() };
    f.replica.history().unwrap().before(&root, f.seq, 0, &op).unwrap();
    let again = super::view::summary(&dir, &attic_of(&f.root, &f.state)).unwrap();
    assert_eq!(again.sets, before.sets, "a replay journaled its set twice");
    // A torn frame at the end (a kill inside the write): the next open cuts it off.
    let seg = super::journal::list_segments(&dir).unwrap().pop().unwrap();
    let path = dir.join(super::journal::segment_name(seg));
    let len = std::fs::metadata(&path).unwrap().len();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(&super::record::MAGIC);
    bytes.extend_from_slice(&[9; 40]);
    std::fs::write(&path, &bytes).unwrap();
    drop(f.replica);
    let _r = Replica::open(&f.root, &f.state).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
}

#[test]
fn a_pinned_point_survives_a_retention_cut_that_would_drop_everything() {
    use crate::retention::{Retention, SizeLimit};
    use std::time::Duration;
    let mut f = Fixture::new();
    f.replica.history().unwrap().journal().set_segment_bytes(1);
    f.workload();
    let point = 6;
    let mut view = PointView::open(&f.root, &dir_of(&f.state), point, f.seq).unwrap();
    let h = f.replica.history().unwrap();
    h.set_retention(Retention { keep: Duration::ZERO, size: SizeLimit::Bytes(0), min: Duration::ZERO });
    let (plan, _) = h.retain(f.base + f.seq * 1000 + 1, 0, u64::MAX).unwrap();
    assert!(plan.pause, "bytes were wanted that the pin holds");
    let first = h.journal().segments()[0].seg.first_seq;
    assert!(first <= point + 1, "a segment the view needs was dropped (first left {first})");
    let out = tempfile::tempdir_in(f.dir.path()).unwrap();
    restore(&mut view, &[], out.path(), &mut |_| {}).unwrap();
    let d = diff_snapshots(&f.shots[point as usize], &snapshot(out.path(), Compare::default()));
    assert!(d.is_empty(), "{d}");
    // Without the pin the same cut takes everything but the newest segment.
    drop(view);
    let h = f.replica.history().unwrap();
    h.retain(f.base + f.seq * 1000 + 1, 0, u64::MAX).unwrap();
    assert!(h.journal().segments().len() <= 1);
}

#[test]
fn retention_drops_old_segments_and_their_attic_never_the_minimum_window() {
    use crate::retention::{Retention, SizeLimit};
    use std::time::Duration;
    let mut f = Fixture::new();
    f.replica.history().unwrap().journal().set_segment_bytes(1);
    f.workload();
    let h = f.replica.history().unwrap();
    let segs = h.journal().segments().len();
    assert!(segs > 10, "{segs} segments");
    let bytes = h.journal().bytes();
    // Everything is older than `keep` but the newest 5 ms are inside `min`.
    let now = f.base + f.seq * 1000 + 1;
    h.set_retention(Retention {
        keep: Duration::ZERO,
        size: SizeLimit::Bytes(0),
        min: Duration::from_micros(5000),
    });
    let (plan, _) = h.retain(now, 0, u64::MAX).unwrap();
    assert!(plan.pause, "bytes still needed with only the minimum window left");
    let left = h.journal().segments().to_vec();
    assert!(left.iter().all(|s| s.seg.newest_time_us >= now - 5000), "{left:?}");
    assert!(!left.is_empty());
    assert!(h.journal().bytes() < bytes);
    let oldest = left[0].seg.first_seq - 1;
    // The points still held restore exactly; older ones are refused.
    let (_keep, to) = f.restore_at(oldest, &[]);
    let d = diff_snapshots(&f.shots[oldest as usize], &snapshot(&to, Compare::default()));
    assert!(d.is_empty(), "{d}");
    assert!(PointView::open(&f.root, &dir_of(&f.state), oldest - 1, f.seq).is_err());
    let attics = std::fs::read_dir(attic_of(&f.root, &f.state)).unwrap().count();
    assert!(attics <= left.len(), "{attics} attic dirs for {} segments", left.len());
}

#[test]
fn the_quota_counts_the_history_as_a_walk_finds_it() {
    use crate::quota::{Account, Limits, Usage};
    use crate::retention::{Retention, SizeLimit};
    use std::sync::Arc;
    use std::time::Duration;
    let mut f = Fixture::new();
    let roots = vec![f.dir.path().join("replicas/src"), f.dir.path().join("state/src")];
    let account = Arc::new(Account::new(roots.clone(), Limits { bytes: Some(1 << 40), files: None }));
    f.replica.set_account(account.clone());
    f.replica.history().unwrap().journal().set_segment_bytes(64 << 10);
    let walk = || {
        roots
            .iter()
            .map(|r| crate::quota::walk(r).unwrap())
            .fold(Usage::default(), |a, b| Usage { bytes: a.bytes + b.bytes, files: a.files + b.files })
    };
    f.workload();
    let used = account.used().expect("counted");
    let fresh = walk();
    assert_eq!(used.files, fresh.files, "inodes: running {used:?}, walk {fresh:?}");
    assert!(used.bytes.abs_diff(fresh.bytes) <= 16 << 10, "bytes: running {used:?}, walk {fresh:?}");
    // Retention frees what it drops, in the count too.
    let h = f.replica.history().unwrap();
    h.set_retention(Retention { keep: Duration::ZERO, size: SizeLimit::Bytes(0), min: Duration::ZERO });
    let (_, freed) = h.retain(f.base + f.seq * 1000 + 1, 0, 0).unwrap();
    account.record(Usage::default(), freed);
    let used = account.used().unwrap();
    let fresh = walk();
    assert_eq!(used.files, fresh.files, "after retention: running {used:?}, walk {fresh:?}");
    assert!(
        used.bytes.abs_diff(fresh.bytes) <= 16 << 10,
        "after retention: running {used:?}, walk {fresh:?}"
    );
}

#[test]
fn history_turned_off_then_on_holds_no_stale_points() {
    let mut f = Fixture::new();
    f.workload();
    f.replica.set_history(None).unwrap();
    assert!(!dir_of(&f.state).exists(), "the history of before was kept");
    f.write("b.locked", 0, b"while off");
    f.replica.set_history(Some(super::DEFAULT_RETENTION)).unwrap();
    f.write("b.locked", 0, b"back on!!");
    let s = super::view::summary(&dir_of(&f.state), &attic_of(&f.root, &f.state)).unwrap();
    assert_eq!(s.oldest.map(|o| o.0), Some(f.seq - 1), "{s:?}");
    let (_keep, to) = f.restore_at(f.seq - 1, &[]);
    let d = diff_snapshots(&f.shots[(f.seq - 1) as usize], &snapshot(&to, Compare::default()));
    assert!(d.is_empty(), "{d}");
    assert!(PointView::open(&f.root, &dir_of(&f.state), f.seq - 2, f.seq).is_err());
}

/// A preallocated file (as `fallocate`, fio and `qemu-img ... preallocation=falloc` make them)
/// overwritten in large writes: ranges never written are taken as zeros without being read,
/// and ranges written just before (still only in the page cache, over extents the disk holds
/// as unwritten) are read; every point restores exactly.
#[test]
fn overwrites_of_a_preallocated_file_restore_exactly_at_every_point() {
    let mut f = Fixture::new();
    let mib = 1u64 << 20;
    f.apply(Op::Create { path: w("img"), mode: 0o644 });
    f.apply(Op::Fallocate { path: w("img"), mode: 0, offset: 0, len: 4 * mib });
    let a: Vec<u8> = (0..mib as u32).map(|i| (i % 253) as u8 | 1).collect();
    let b: Vec<u8> = (0..mib as u32).map(|i| (i % 241) as u8 | 2).collect();
    f.write("img", 0, &a);
    // Over what was just written (not yet on disk): its old bytes are `a`, not zeros.
    f.write("img", 0, &b);
    // Half over written data, half over preallocated space.
    f.write("img", mib / 2, &a);
    f.write("img", 3 * mib, &b[..256 << 10]);
    f.replica.commit().unwrap();
    f.write("img", 2 * mib + 4096, &a[..128 << 10]);
    for point in 0..=f.seq {
        let (_keep, to) = f.restore_at(point, &[]);
        let d = diff_snapshots(&f.shots[point as usize], &snapshot(&to, Compare::default()));
        assert!(d.is_empty(), "point {point}:\n{d}");
    }
}

/// New files written then given their attributes (what a mirror of small files sends): the
/// attributes' undo names the object the write found, also when another object took the name
/// in between (a rename, then a new file of that name).
#[test]
fn attributes_of_new_files_restore_exactly_at_every_point() {
    let mut f = Fixture::new();
    let attrs = |mode, secs| Attrs {
        mode: Some(mode),
        mtime: Some(Timestamp { secs, nanos: 3 }),
        atime: Some(Timestamp { secs, nanos: 3 }),
        ..Attrs::default()
    };
    for (round, mode) in [(0i64, 0o640), (1, 0o604)] {
        f.apply(Op::Create { path: w("n"), mode: 0o600 });
        f.write("n", 0, format!("round {round}").as_bytes());
        f.apply(Op::SetAttr { path: w("n"), attrs: attrs(mode, 2_000_000 + round) });
        f.write("n", 7, b"+");
        f.apply(Op::SetAttr { path: w("n"), attrs: attrs(0o600, 3_000_000 + round) });
        f.apply(Op::Rename { from: w("n"), to: w(&format!("kept{round}")), flags: RenameFlags::default() });
    }
    for point in 0..=f.seq {
        let (_keep, to) = f.restore_at(point, &[]);
        let d = diff_snapshots(&f.shots[point as usize], &snapshot(&to, Compare::default()));
        assert!(d.is_empty(), "point {point}:\n{d}");
    }
}
