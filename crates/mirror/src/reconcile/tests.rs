//! The reconciler against a real replica: every test applies the emitted ops with
//! `doppel-apply` and compares the trees.

use std::time::{Duration, Instant};

use doppel_apply::Replica;
use doppel_proto::{ListScope, OpRecord};
use doppel_testkit::{Compare, Tree, compare_trees, noise};

use super::*;
use crate::events::EventQueue;

struct Rig {
    _dir: tempfile::TempDir,
    src: PathBuf,
    dst: PathBuf,
    replica: Replica,
    rec: Reconciler,
    seq: u64,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let dst = dir.path().join("dst");
        std::fs::create_dir_all(&src).unwrap();
        let replica = Replica::open(&dst, &dir.path().join("state")).unwrap();
        let rec = Reconciler::new(&src, Selection::all(), Index::temporary().unwrap());
        Rig { _dir: dir, src, dst, replica, rec, seq: 0 }
    }

    fn tree(&self) -> Tree {
        Tree::at(&self.src)
    }

    /// Applies ops; returns payload bytes.
    fn apply(&mut self, ops: Vec<Op>) -> u64 {
        let mut bytes = 0;
        for op in ops {
            bytes += op.data_len() as u64;
            self.seq += 1;
            let out = self.replica.apply(&OpRecord { seq: self.seq, time_us: 0, op: op.clone() }).unwrap();
            assert_eq!(out, doppel_apply::Outcome::Applied, "{op:?}");
        }
        bytes
    }

    /// Full rescan; returns (ops, payload bytes).
    fn rescan(&mut self) -> (Vec<Op>, u64) {
        let mut ops = Vec::new();
        self.rec.sync_tree(&RelPath::root(), &mut ops).unwrap();
        self.rec.finish(&mut ops).unwrap();
        let shown = ops.clone();
        let bytes = self.apply(ops);
        (shown, bytes)
    }

    fn assert_equal(&self) {
        compare_trees(&self.src, &self.dst, Compare::default()).unwrap();
    }

    fn listing(&self, scope: &ListScope) -> Vec<Entry> {
        let mut v = Vec::new();
        doppel_apply::listing::list(self.replica.root(), scope, &mut |e| {
            v.push(e);
            Ok(())
        })
        .unwrap();
        v
    }
}

fn p(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

#[test]
fn initial_mirror_then_only_deltas() {
    let mut r = Rig::new();
    r.tree().standard();
    let (_, sent) = r.rescan();
    r.assert_equal();
    assert!(sent >= 170_000, "{sent}");
    // Nothing changed: nothing sent.
    let (ops, sent) = r.rescan();
    assert!(ops.is_empty(), "{ops:?}");
    assert_eq!(sent, 0);
    // 4 KiB changed in the middle of a 1 MiB file: one block goes.
    let big = noise(9, 1 << 20);
    r.tree().file("big", &big);
    r.rescan();
    let mut changed = big.clone();
    changed[500_000..504_096].copy_from_slice(&noise(10, 4096));
    std::fs::write(r.src.join("big"), &changed).unwrap();
    let (_, sent) = r.rescan();
    r.assert_equal();
    assert!(sent <= 2 * BLOCK, "{sent}");
    // An append to a file whose last block is short sends just the new bytes.
    let mut f = std::fs::OpenOptions::new().append(true).open(r.src.join("dir1/b.bin")).unwrap();
    std::io::Write::write_all(&mut f, b"appended!").unwrap();
    drop(f);
    let (_, sent) = r.rescan();
    assert_eq!(sent, 9);
    r.assert_equal();
}

const BLOCK: u64 = doppel_proto::BLOCK_SIZE;

#[test]
fn every_kind_of_change_converges() {
    let mut r = Rig::new();
    r.tree().standard();
    r.rescan();
    let t = r.tree();
    t.file("a.txt", b"rewritten\n");
    std::fs::OpenOptions::new().write(true).open(t.path("dir1/sub/deeper/d")).unwrap().set_len(10).unwrap();
    std::fs::rename(t.path("dir1/sub"), t.path("moved")).unwrap();
    std::fs::remove_file(t.path("empty")).unwrap();
    std::fs::remove_dir(t.path("emptydir")).unwrap();
    t.chmod("dir2/e", 0o640);
    std::fs::remove_file(t.path("link-rel")).unwrap();
    t.symlink("link-rel", "a.txt");
    // A file becomes a directory and a directory a file.
    std::fs::remove_file(t.path("dir2/e")).unwrap();
    t.file("dir2/e/inside", b"x");
    std::fs::remove_dir_all(t.path("dir1")).unwrap();
    t.file("dir1", b"now a file");
    r.rescan();
    r.assert_equal();
}

#[test]
fn renames_go_as_renames_through_the_event_queue() {
    let mut r = Rig::new();
    r.tree().standard().file("big", &noise(4, 300_000));
    r.rescan();
    let t = r.tree();
    std::fs::rename(t.path("big"), t.path("big2")).unwrap();
    std::fs::rename(t.path("dir1"), t.path("dir9")).unwrap();
    t.file("dir9/new", b"new file in the moved dir");
    let mut q = EventQueue::new();
    let mut ops = Vec::new();
    let evs = [
        doppel_capture::FsEvent::Renamed { from: p("big"), to: p("big2"), is_dir: false },
        doppel_capture::FsEvent::Renamed { from: p("dir1"), to: p("dir9"), is_dir: true },
        doppel_capture::FsEvent::Created { path: p("dir9/new"), is_dir: false },
        doppel_capture::FsEvent::Closed(p("dir9/new")),
    ];
    let before =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64;
    for ev in evs {
        q.push(ev, &mut r.rec, &mut ops).unwrap();
    }
    // Ops will carry the time the first change was noticed, not the time they are made.
    let noticed = q.oldest_us().expect("changes pending");
    assert!(noticed >= before);
    q.flush(&mut r.rec, &mut ops).unwrap();
    assert_eq!(q.oldest_us(), None);
    let renames = ops.iter().filter(|o| matches!(o, Op::Rename { .. })).count();
    assert_eq!(renames, 2, "{ops:?}");
    let sent = r.apply(ops);
    assert_eq!(sent, 25, "only the new file's bytes");
    r.assert_equal();
}

/// A file rewritten just before its directory is renamed, with the queue flushed between the
/// file's event and the rename's (the rename not read yet): the file must neither be deleted
/// from the replica nor lose its new content (files went missing so in
/// crates/cli/tests/many_files.rs).
#[test]
fn a_change_flushed_before_its_directory_rename_is_read_is_not_lost() {
    use doppel_capture::FsEvent;
    let mut r = Rig::new();
    r.tree().file("d/f", b"old content").file("d/g", b"untouched").file("gone/h", b"x");
    r.rescan();
    let t = r.tree();
    t.file("d/f", b"new content, longer");
    t.file("gone/h", b"changed before its directory was removed");
    std::fs::rename(t.path("d"), t.path("e")).unwrap();
    std::fs::remove_dir_all(t.path("gone")).unwrap();
    let mut q = EventQueue::new();
    let mut ops = Vec::new();
    q.push(FsEvent::Closed(p("d/f")), &mut r.rec, &mut ops).unwrap();
    q.push(FsEvent::Closed(p("gone/h")), &mut r.rec, &mut ops).unwrap();
    q.flush(&mut r.rec, &mut ops).unwrap();
    assert!(ops.iter().all(|o| !matches!(o, Op::Unlink { .. })), "{ops:?}");
    assert!(!q.is_empty(), "the names whose directory vanished wait for its event");
    q.push(FsEvent::Renamed { from: p("d"), to: p("e"), is_dir: true }, &mut r.rec, &mut ops).unwrap();
    q.push(FsEvent::Removed { path: p("gone"), is_dir: true }, &mut r.rec, &mut ops).unwrap();
    q.flush(&mut r.rec, &mut ops).unwrap();
    assert!(q.is_empty(), "explained by the rename and the removal");
    let renames = ops.iter().filter(|o| matches!(o, Op::Rename { .. })).count();
    assert_eq!(renames, 1, "{ops:?}");
    r.apply(ops);
    r.assert_equal();

    // Stopping flushes everything: a name still waiting is taken as gone.
    t.file("e/f", b"changed again");
    std::fs::remove_dir_all(t.path("e")).unwrap();
    let mut ops = Vec::new();
    q.push(FsEvent::Closed(p("e/f")), &mut r.rec, &mut ops).unwrap();
    q.flush_all(&mut r.rec, &mut ops).unwrap();
    assert!(q.is_empty());
    assert!(ops.iter().any(|o| matches!(o, Op::Unlink { .. })), "{ops:?}");
}

/// A source whose file times are made up (QEMU's FUSE export of a disk says "now" at every
/// `stat`): a new mtime alone is no difference, one that comes with new content still travels.
#[test]
fn where_the_source_makes_up_file_times_an_mtime_alone_is_no_difference() {
    struct MadeUpTimes;
    struct Nothing;
    impl Guard for MadeUpTimes {
        fn entry(&self) -> Box<dyn Held + '_> {
            Box::new(Nothing)
        }
        fn file(&self, _dev: u64, _ino: u64) -> Box<dyn Held + '_> {
            Box::new(Nothing)
        }
        fn times_kept(&self) -> bool {
            false
        }
    }
    let mut r = Rig::new();
    r.tree().file("disk.raw", &noise(1, 200_000));
    r.rescan();
    let disk = r.src.join("disk.raw");
    let set_mtime = |secs: i64| {
        let t = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec { tv_sec: secs, tv_nsec: 0 },
            last_modification: rustix::fs::Timespec { tv_sec: secs, tv_nsec: 0 },
        };
        rustix::fs::utimensat(rustix::fs::CWD, &disk, &t, rustix::fs::AtFlags::empty()).unwrap();
    };
    set_mtime(2_000_000_000);
    let index = std::mem::replace(&mut r.rec.index, Index::temporary().unwrap());
    r.rec = Reconciler::new(&r.src, Selection::all(), index).with_guard(Arc::new(MadeUpTimes));
    let (ops, _) = r.rescan();
    assert!(ops.is_empty(), "an mtime alone: {ops:?}");
    r.tree().file("disk.raw", &noise(2, 200_000));
    set_mtime(2_000_000_100);
    let (ops, _) = r.rescan();
    assert!(ops.iter().any(|o| matches!(o, Op::Write { .. })), "{ops:?}");
    assert!(
        ops.iter().any(
            |o| matches!(o, Op::SetAttr { attrs, .. } if attrs.mtime.is_some_and(|t| t.secs == 2_000_000_100))
        ),
        "the mtime travels with the content: {ops:?}"
    );
    r.assert_equal();
}

#[test]
fn atomic_save_of_a_temp_file_and_rename_chains() {
    let mut r = Rig::new();
    r.tree().file("doc", b"version 1");
    r.rescan();
    let t = r.tree();
    // Editor pattern: write doc.tmp, rename over doc; then a chain a -> b -> c.
    t.file("doc.tmp", b"version 2");
    std::fs::rename(t.path("doc.tmp"), t.path("doc")).unwrap();
    t.file("a", &noise(5, 200_000));
    let mut q = EventQueue::new();
    let mut ops = Vec::new();
    for ev in [
        doppel_capture::FsEvent::Created { path: p("doc.tmp"), is_dir: false },
        doppel_capture::FsEvent::Closed(p("doc.tmp")),
        doppel_capture::FsEvent::Renamed { from: p("doc.tmp"), to: p("doc"), is_dir: false },
        doppel_capture::FsEvent::Created { path: p("a"), is_dir: false },
    ] {
        q.push(ev, &mut r.rec, &mut ops).unwrap();
    }
    q.flush(&mut r.rec, &mut ops).unwrap();
    r.apply(ops);
    r.assert_equal();
    std::fs::rename(t.path("a"), t.path("b")).unwrap();
    std::fs::rename(t.path("b"), t.path("c")).unwrap();
    let mut ops = Vec::new();
    for ev in [
        doppel_capture::FsEvent::Renamed { from: p("a"), to: p("b"), is_dir: false },
        doppel_capture::FsEvent::Renamed { from: p("b"), to: p("c"), is_dir: false },
    ] {
        q.push(ev, &mut r.rec, &mut ops).unwrap();
    }
    q.flush(&mut r.rec, &mut ops).unwrap();
    let sent = r.apply(ops);
    assert_eq!(sent, 0, "a rename chain moves no data");
    r.assert_equal();
}

#[test]
fn difference_mirror_against_a_divergent_replica_sends_only_differences() {
    let mut r = Rig::new();
    r.tree().standard().file("big", &noise(6, 2 << 20));
    r.rescan();
    // The replica drifts: a block changed, an extra file, a missing file, a changed mode.
    let dst = r.dst.clone();
    let f = std::fs::OpenOptions::new().write(true).open(dst.join("big")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"corrupt", 1_000_000).unwrap();
    std::fs::write(dst.join("extra"), b"only here").unwrap();
    std::fs::create_dir_all(dst.join("extradir/deep")).unwrap();
    std::fs::remove_file(dst.join("dir2/e")).unwrap();
    std::fs::set_permissions(dst.join("a.txt"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // A new reconciler with no index, seeded from the replica's listing.
    let listing = r.listing(&ListScope::All);
    let mut rec = Reconciler::new(&r.src, Selection::all(), Index::temporary().unwrap());
    rec.seed_all(listing).unwrap();
    r.rec = rec;
    let (_, sent) = r.rescan();
    r.assert_equal();
    // The changed block and the missing 5-byte file; hard links already on the replica stay.
    assert_eq!(sent, BLOCK + 5);
}

#[test]
fn hard_links_stay_links() {
    let mut r = Rig::new();
    r.tree().file("x/one", b"shared").hardlink("x/two", "x/one").hardlink("three", "x/one");
    let (ops, _) = r.rescan();
    assert_eq!(ops.iter().filter(|o| matches!(o, Op::Link { .. })).count(), 2);
    r.assert_equal();
    // Writing through one name is seen through the others on both sides.
    std::fs::write(r.src.join("three"), b"changed through three").unwrap();
    r.rescan();
    r.assert_equal();
    // Breaking the link on the source breaks it on the replica.
    std::fs::remove_file(r.src.join("x/two")).unwrap();
    std::fs::write(r.src.join("x/two"), b"independent").unwrap();
    r.rescan();
    r.assert_equal();
}

#[test]
fn selection_rules_apply_and_removal_follows_exclusion() {
    let mut r = Rig::new();
    r.tree().file("keep.txt", b"k").file("cache/big.tmp", b"t").file("x.tmp", b"t");
    r.rec = Reconciler::new(
        &r.src,
        Selection::new(&[], &["*.tmp".into(), "cache/".into()]).unwrap(),
        Index::temporary().unwrap(),
    );
    r.rescan();
    let names: Vec<String> = doppel_testkit::snapshot(&r.dst, Compare::default()).into_keys().collect();
    assert_eq!(names, [".", "keep.txt"]);
}

#[test]
fn suspects_after_a_crash_are_exactly_the_changed_names() {
    let mut r = Rig::new();
    r.tree().standard();
    r.rescan();
    // The index is saved well after the last change it describes (the racy-timestamp margin
    // is 100 ms), then the tree changes.
    let now_us =
        || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64;
    std::thread::sleep(std::time::Duration::from_millis(150));
    let old = now_us();
    r.tree().file("a.txt", b"changed").file("newfile", b"n");
    std::fs::remove_file(r.src.join("empty")).unwrap();
    let s: Vec<String> = r.rec.suspects(old).unwrap().iter().map(|p| p.to_string()).collect();
    // The root directory's mtime changed too (a name was added and one removed).
    assert_eq!(s, [".", "a.txt", "empty", "newfile"]);
    // Saved just now: everything touched recently is racy and suspect.
    // A targeted mirror of the suspects against the replica converges.
    let suspects = r.rec.suspects(old).unwrap();
    let listing = r.listing(&ListScope::Paths(suspects.iter().map(|p| p.to_wire()).collect()));
    r.rec.seed_paths(&suspects, listing).unwrap();
    let mut ops = Vec::new();
    for s in &suspects {
        r.rec.sync_entry(s, &mut ops).unwrap();
    }
    r.rec.finish(&mut ops).unwrap();
    r.apply(ops);
    r.assert_equal();
}

#[test]
fn verify_of_an_equal_replica_finds_nothing() {
    let mut r = Rig::new();
    r.tree().standard().file("x/one", b"shared").hardlink("x/two", "x/one");
    r.rescan();
    r.assert_equal();
    let listing = r.listing(&ListScope::All);
    let (report, paths) = crate::verify::compare(&r.src, Selection::all(), listing, None).unwrap();
    assert!(report.differences.is_empty(), "{:?}", report.differences);
    assert!(paths.is_empty());
    assert!(report.entries_compared >= 15);
}

/// A replica whose target strips privileges differs from its source in set-id bits and owners
/// only: verify says so as the policy's doing, and still reports real damage as damage.
#[test]
fn verify_names_stripped_privileges_as_policy() {
    use std::os::unix::fs::PermissionsExt;
    if !doppel_testkit::skip::require(rustix::process::geteuid().is_root(), "chown needs root") {
        return;
    }
    let mut r = Rig::new();
    let strip = doppel_apply::Rule::Strip;
    r.replica.set_privileges(doppel_apply::PrivilegePolicy {
        devices: strip,
        ..doppel_apply::PrivilegePolicy::all(strip)
    });
    r.tree().file("su", b"x").file("own", b"y").file("plain", b"z");
    std::fs::set_permissions(r.src.join("su"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::chown(r.src.join("own"), Some(1234), Some(1234)).unwrap();
    let mut ops = Vec::new();
    r.rec.sync_tree(&RelPath::root(), &mut ops).unwrap();
    r.rec.finish(&mut ops).unwrap();
    for op in ops {
        r.seq += 1;
        r.replica.apply(&OpRecord { seq: r.seq, time_us: 0, op }).unwrap();
    }
    // Real damage beside it: a changed mode.
    std::fs::set_permissions(r.dst.join("plain"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let listing = r.listing(&ListScope::All);
    let (report, _) = crate::verify::compare(&r.src, Selection::all(), listing, None).unwrap();
    let got: Vec<(&str, &str)> =
        report.differences.iter().map(|d| (d.path.as_str(), d.what.as_str())).collect();
    assert_eq!(
        got,
        [
            ("own", crate::verify::PRIVILEGED),
            ("plain", "attributes differ"),
            ("su", crate::verify::PRIVILEGED)
        ]
    );
}

/// A file with two names, damaged on the replica through one of them (so both see it): the
/// repair writes the source's bytes and mode into that file, rather than linking the damaged
/// name to the other one (the same damaged file) again.
#[test]
fn repair_of_a_hard_linked_file_fixes_the_file_its_names_share() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut r = Rig::new();
    r.tree().file("x/one", b"original\n").hardlink("x/two", "x/one").file("x/three", b"3");
    r.rescan();
    std::fs::write(r.dst.join("x/one"), b"CORRUPT\n").unwrap();
    std::fs::set_permissions(r.dst.join("x/two"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let listing = r.listing(&ListScope::All);
    let (report, differing) = crate::verify::compare(&r.src, Selection::all(), listing, None).unwrap();
    assert!(!report.differences.is_empty());
    let mut ops = Vec::new();
    let unrepaired = crate::verify::repair(&mut r.rec, &differing, &mut ops).unwrap();
    assert!(unrepaired.is_empty(), "{unrepaired:?}");
    assert!(!ops.iter().any(|o| matches!(o, Op::Unlink { .. } | Op::Link { .. })), "{ops:?}");
    r.apply(ops);
    r.assert_equal();
    let (one, two) = (r.dst.join("x/one").metadata().unwrap(), r.dst.join("x/two").metadata().unwrap());
    assert_eq!((one.ino(), one.nlink()), (two.ino(), 2));
    // The job's index describes the replica again: nothing is left to do.
    let (ops, _) = r.rescan();
    assert!(ops.iter().all(|o| matches!(o, Op::SetAttr { .. })), "{ops:?}");
}

/// A name whose repair has nothing to send is reported as not repaired, not as queued.
#[test]
fn a_difference_the_repair_sends_nothing_for_is_reported() {
    let mut r = Rig::new();
    r.tree().file("a", b"a");
    r.rescan();
    std::fs::write(r.dst.join("a"), b"b").unwrap();
    let listing = r.listing(&ListScope::All);
    let (_, mut differing) = crate::verify::compare(&r.src, Selection::all(), listing, None).unwrap();
    // The replica's entry as the source's: the index takes the damage for the source's state.
    let truth = r.rec.index.get(&p("a")).unwrap();
    differing.names[0].1 = truth;
    let unrepaired = crate::verify::repair(&mut r.rec, &differing, &mut Vec::new()).unwrap();
    assert_eq!(unrepaired, [p("a")]);
}

#[test]
fn a_name_created_and_removed_between_flushes_still_moves_its_directory_time() {
    let mut r = Rig::new();
    r.tree().file("d/keep", b"k");
    // An old time, so the create and remove below are sure to change it.
    let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    std::fs::File::open(r.src.join("d")).unwrap().set_modified(old).unwrap();
    r.rescan();
    r.assert_equal();
    // A journal file lives and dies within one debounce window: no op for it, and `d` itself
    // gets no event.
    std::fs::write(r.src.join("d/x"), b"journal").unwrap();
    std::fs::remove_file(r.src.join("d/x")).unwrap();
    let mut q = EventQueue::new();
    let mut ops = Vec::new();
    for ev in [
        doppel_capture::FsEvent::Created { path: p("d/x"), is_dir: false },
        doppel_capture::FsEvent::Closed(p("d/x")),
        doppel_capture::FsEvent::Removed { path: p("d/x"), is_dir: false },
    ] {
        q.push(ev, &mut r.rec, &mut ops).unwrap();
    }
    q.flush(&mut r.rec, &mut ops).unwrap();
    assert!(matches!(&ops[..], [Op::SetAttr { attrs, .. }] if attrs.mtime.is_some()), "{ops:?}");
    r.apply(ops);
    r.assert_equal();
    // The time is now in the index: looking again sends nothing.
    let mut ops = Vec::new();
    q.push(doppel_capture::FsEvent::Modified(p("d/keep")), &mut r.rec, &mut ops).unwrap();
    q.flush(&mut r.rec, &mut ops).unwrap();
    assert!(ops.is_empty(), "{ops:?}");
}

/// Records the tree's progress each time an op is emitted; the first op waits (with a
/// deadline) for the count running beside the comparison, so every record shows a total.
struct Watching(Arc<TreeProgress>, Vec<Option<TreeCounts>>);

impl OpSink for Watching {
    fn emit(&mut self, _op: Op) -> Result<(), MirrorError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.0.get().is_some_and(|c| c.total.is_none()) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        self.1.push(self.0.get());
        Ok(())
    }
}

/// A whole-tree comparison reports the tree's regular files and bytes once counted, counts
/// what it compared (read, or unchanged) up to exactly that total, and ends with the walk.
#[test]
fn whole_tree_comparison_reports_progress() {
    let mut r = Rig::new();
    r.tree().file("a", &noise(1, 200_000)).file("d/b", &noise(2, 70_000)).file("d/c", b"").symlink("l", "a");
    let tree = r.rec.stats().tree.clone();
    assert_eq!(tree.get(), None, "nothing runs yet");
    let mut sink = Watching(tree.clone(), Vec::new());
    r.rec.sync_tree(&RelPath::root(), &mut sink).unwrap();
    let total = Some((3, 270_000));
    assert!(sink.1.iter().all(|c| c.is_some_and(|c| c.total == total)), "{:?}", sink.1);
    let done: Vec<u64> = sink.1.iter().map(|c| c.unwrap().bytes_done).collect();
    assert!(done.windows(2).all(|w| w[0] <= w[1]) && done.iter().any(|&b| b > 0 && b < 270_000), "{done:?}");
    assert_eq!(tree.get(), None, "ended with the comparison");

    // Unchanged files count as compared without being read.
    let hashed = r.rec.stats().bytes_hashed.load(Ordering::Relaxed);
    let mut sink = Watching(tree.clone(), Vec::new());
    r.tree().file("new", b"12345");
    r.rec.sync_tree(&RelPath::root(), &mut sink).unwrap();
    let last = sink.1.last().copied().flatten().unwrap();
    assert_eq!(last.total, Some((4, 270_005)));
    assert!(last.bytes_done >= 270_000, "unchanged files counted before the new one: {:?}", sink.1);
    let done = (tree.files_done.load(Ordering::Relaxed), tree.bytes_done.load(Ordering::Relaxed));
    assert_eq!(done, (4, 270_005));
    assert_eq!(r.rec.stats().bytes_hashed.load(Ordering::Relaxed) - hashed, 5);

    // A subtree's comparison (a new directory in watch mode) is not the whole tree's.
    let mut sink = Watching(tree.clone(), Vec::new());
    r.tree().file("e/f", b"x");
    r.rec.sync_tree(&p("e"), &mut sink).unwrap();
    assert!(!sink.1.is_empty() && sink.1.iter().all(Option::is_none), "{:?}", sink.1);
}

/// The whole-tree merge of walk and index across many chunks of the index: names whose bytes
/// sort around `/` ("a!", "a-x" next to "a/..."), whole directories gone, files turned into
/// directories and back, all in one comparison.
#[test]
fn the_walk_and_index_merge_holds_across_chunks_and_odd_names() {
    let mut r = Rig::new();
    let t = r.tree();
    for d in ["a", "a!", "a-x", "b"] {
        for i in 0..300 {
            t.file(&format!("{d}/f{i:03}"), format!("{d} {i}").as_bytes());
        }
    }
    t.file("a0", b"after a");
    r.rescan();
    r.assert_equal();
    let n = |p: &str| {
        r.rec
            .index
            .first_paths(&RelPath::root(), None, usize::MAX)
            .unwrap()
            .iter()
            .any(|x| x.to_string() == p)
    };
    assert!(n("a!/f299") && n("a-x/f000"));
    std::fs::remove_dir_all(r.src.join("a!")).unwrap();
    for i in (0..300).step_by(7) {
        std::fs::remove_file(r.src.join(format!("a/f{i:03}"))).unwrap();
        std::fs::remove_file(r.src.join(format!("b/f{i:03}"))).unwrap();
    }
    std::fs::remove_file(r.src.join("a-x/f100")).unwrap();
    r.tree().file("a-x/f100/inside", b"now a directory");
    std::fs::remove_dir_all(r.src.join("b")).unwrap();
    r.tree().file("b", b"now a file");
    r.rescan();
    r.assert_equal();
    // Nothing left to do, and the index holds exactly the tree.
    let (ops, _) = r.rescan();
    assert!(ops.is_empty(), "{} ops on an equal tree", ops.len());
    let indexed = r.rec.index.len().unwrap();
    let mut on_disk = 0;
    doppel_fs::walk::walk(&r.src, &RelPath::root(), &Selection::all(), &mut |_| {
        on_disk += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(indexed, on_disk);
}

/// A failback's quick check: a file the listing vouches for is taken as equal when its size
/// and modification time match (it is not read, so a difference planted under the same time
/// stays), and read like any other when the time differs; a file not vouched for is always
/// read. Attributes are compared either way.
#[test]
fn vouched_entries_of_the_same_size_and_time_are_not_read() {
    let mut r = Rig::new();
    let old = |seed| noise(seed, 300_000);
    r.tree().file("same", &old(1)).file("touched", &old(2)).file("plain", &old(3));
    r.rescan();
    for (name, seed, keep_time) in [("same", 11, true), ("touched", 12, false), ("plain", 13, true)] {
        let before = std::fs::metadata(r.src.join(name)).unwrap().modified().unwrap();
        std::fs::write(r.src.join(name), noise(seed, 300_000)).unwrap();
        let f = std::fs::File::options().write(true).open(r.src.join(name)).unwrap();
        let when = if keep_time { before } else { before + std::time::Duration::from_secs(5) };
        f.set_modified(when).unwrap();
    }
    r.tree().chmod("same", 0o600);
    let listing: Vec<Entry> = r
        .listing(&ListScope::All)
        .into_iter()
        .map(|e| Entry { vouched: e.path != p("plain").to_wire(), ..e })
        .collect();
    let mut rec = Reconciler::new(&r.src, Selection::all(), Index::temporary().unwrap());
    rec.seed_all(listing).unwrap();
    r.rec = rec;
    let (_, sent) = r.rescan();
    let stats = r.rec.stats();
    assert_eq!(stats.files_vouched.load(Ordering::Relaxed), 1);
    assert_eq!(stats.bytes_hashed.load(Ordering::Relaxed), 600_000, "only `touched` and `plain` are read");
    assert_eq!(sent, 600_000);
    assert_eq!(std::fs::read(r.dst.join("same")).unwrap(), old(1), "a vouched file was read");
    for name in ["touched", "plain"] {
        assert_eq!(
            std::fs::read(r.dst.join(name)).unwrap(),
            std::fs::read(r.src.join(name)).unwrap(),
            "{name}"
        );
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(r.dst.join("same")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o7777, 0o600, "the vouched file's mode was not compared");
    // The vouched file's blocks are the listing's, which describe the replica: a later change
    // sends every block that differs from what the replica holds.
    let mut changed = std::fs::read(r.src.join("same")).unwrap();
    changed[..7].copy_from_slice(b"changed");
    std::fs::write(r.src.join("same"), &changed).unwrap();
    r.rescan();
    r.assert_equal();
}

/// A difference mirror against a full replica hashes the source's files while the listing
/// arrives, and the comparison then reads only the blocks that differ from the replica's; a
/// file changed after it was hashed, or changed too close to the hashing's start for its
/// times to tell, is read whole. The replica ends equal either way.
#[test]
fn files_hashed_while_the_replica_is_listed_are_read_only_where_they_differ() {
    let mut r = Rig::new();
    r.tree()
        .file("big", &noise(1, 1 << 20))
        .file("recent", &noise(2, 200_000))
        .file("rewritten", &noise(3, 300_000));
    r.rescan();
    let mut big = noise(1, 1 << 20);
    big[5 * 65_536 + 10..5 * 65_536 + 20].copy_from_slice(b"0123456789");
    std::fs::write(r.src.join("big"), &big).unwrap();
    std::fs::write(r.src.join("rewritten"), noise(4, 300_000)).unwrap();
    // Older than the racy margin when the hashing starts, except `recent`'s change.
    std::thread::sleep(Duration::from_micros(2 * crate::index::RACY_MARGIN_US));
    std::fs::write(r.src.join("recent"), noise(5, 200_000)).unwrap();
    let listing = r.listing(&ListScope::All);
    let mut rec = Reconciler::new(&r.src, Selection::all(), Index::temporary().unwrap());
    let scratch = tempfile::tempdir().unwrap();
    let prehash = crate::prehash::Prehash::start(&r.src, scratch.path(), 1 << 20, rec.stats()).unwrap();
    listing.iter().for_each(|e| prehash.offer(e));
    let ahead = (1 << 20) + 300_000;
    let deadline = Instant::now() + Duration::from_secs(30);
    while rec.stats().bytes_hashed.load(Ordering::Relaxed) < ahead {
        assert!(Instant::now() < deadline, "the files were not hashed ahead within 30 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Changed after it was hashed: its hashes no longer count.
    std::fs::write(r.src.join("rewritten"), noise(6, 300_000)).unwrap();
    rec.seed_all(listing).unwrap();
    rec.set_prehashed(Some(prehash.finish().unwrap()));
    r.rec = rec;
    let (_, sent) = r.rescan();
    r.assert_equal();
    let hashed = r.rec.stats().bytes_hashed.load(Ordering::Relaxed);
    assert_eq!(hashed, ahead + 65_536 + 200_000 + 300_000, "big: one block; recent, rewritten: whole");
    assert_eq!(sent, 65_536 + 200_000 + 300_000);
}

/// A stopped fuse job's index: every name of the tree by its current stat, the block hashes
/// kept only where the stat shows no change since they were recorded; names gone are gone.
#[test]
fn restating_the_index_keeps_the_blocks_of_unchanged_files_only() {
    let mut r = Rig::new();
    r.tree().file("kept", &noise(1, 200_000)).file("written", &noise(2, 200_000)).file("d/gone", b"x");
    r.rescan();
    let before = r.rec.index.get(&p("kept")).unwrap().unwrap();
    assert_eq!(before.blocks.len(), 4);
    std::fs::write(r.src.join("written"), noise(3, 200_000)).unwrap();
    std::fs::remove_file(r.src.join("d/gone")).unwrap();
    r.tree().file("d/new", b"new");
    let src = r.src.clone();
    r.rec.restat_index(&src).unwrap();
    let index = &r.rec.index;
    assert_eq!(index.get(&p("kept")).unwrap().unwrap(), before, "an unchanged file's entry is kept whole");
    for name in ["written", "d/new", "d"] {
        let e = index.get(&p(name)).unwrap().unwrap();
        let meta = doppel_fs::Meta::from_std(&std::fs::symlink_metadata(r.src.join(name)).unwrap());
        assert!(e.unchanged(&meta), "{name}: not the current stat");
        assert!(e.blocks.is_empty(), "{name}: blocks that no longer describe it");
    }
    assert!(index.get(&p("d/gone")).unwrap().is_none(), "a removed name stayed");
    assert_eq!(index.len().unwrap(), 5, "root, kept, written, d, d/new");
}
