//! Runs of new files applied on several threads ([`Replica::apply_ahead`]).

use std::os::unix::fs::MetadataExt;

use doppel_proto::{Attrs, Op, OpRecord, Timestamp};

use super::{snapshot, w};
use crate::replica::{Outcome, Replica};

/// `files` new files in two directories (each a create, a write and its times), with a file
/// whose parent is missing (refused) in the middle; sequences from 2 (1 makes the directories).
fn new_files(files: usize, size: usize) -> Vec<OpRecord> {
    let mut ops = vec![];
    for i in 0..files {
        let p = if i == files / 2 { "missing/x".to_string() } else { format!("d{}/f{i}", i % 2) };
        let mtime = Some(Timestamp { secs: 1_600_000_000 + i as i64, nanos: 7 });
        ops.push(Op::Create { path: w(&p), mode: 0o600 + (i as u32 % 3) * 0o20 });
        ops.push(Op::Write { path: w(&p), offset: 0, data: vec![i as u8; size] });
        ops.push(Op::SetAttr { path: w(&p), attrs: Attrs { mtime, ..Attrs::default() } });
    }
    ops.into_iter().zip(2..).map(|(op, seq)| OpRecord { seq, time_us: 0, op }).collect()
}

fn replica(dir: &std::path::Path, name: &str, lanes: usize) -> Replica {
    replica_at(&dir.join(name), &dir.join(format!("{name}.state")), lanes)
}

/// A replica without history on `lanes`, with the run's two directories: one made by op 1,
/// the other there before (the runs start at op 2).
fn replica_at(root: &std::path::Path, state: &std::path::Path, lanes: usize) -> Replica {
    let mut r = Replica::open_with_history(root, state, None).unwrap();
    r.set_lanes(lanes);
    r.apply(&OpRecord { seq: 1, time_us: 0, op: Op::Mkdir { path: w("d0"), mode: 0o755 } }).unwrap();
    std::fs::create_dir(r.path().join("d1")).unwrap();
    r
}

/// Applies `recs` as the target's worker does: the run starting at each op ahead, then the
/// op itself counted in order.
fn apply_all(r: &mut Replica, recs: &[OpRecord]) -> Vec<Outcome> {
    (0..recs.len())
        .map(|i| {
            r.apply_ahead(&recs[i..]);
            r.apply(&recs[i]).unwrap()
        })
        .collect()
}

/// Every file's bytes, mode and modification time.
fn files_of(root: &std::path::Path) -> Vec<(String, u32, Vec<u8>, i64, i64)> {
    let mut out: Vec<_> = snapshot(root)
        .into_iter()
        .map(|(p, (mode, content))| {
            let m = std::fs::symlink_metadata(root.join(&p)).unwrap();
            let t = if m.is_file() { (m.mtime(), m.mtime_nsec()) } else { (0, 0) };
            (p, mode, content, t.0, t.1)
        })
        .collect();
    out.sort();
    out
}

/// Applied on four lanes, a run of new files gives the same tree, the same outcomes (a
/// refusal included) and the same applied sequence as on one thread; the lanes did the work
/// before the ops were counted.
#[test]
fn a_run_of_new_files_on_several_lanes_equals_applying_it_op_by_op() {
    let dir = tempfile::tempdir().unwrap();
    let recs = new_files(300, 100);
    let mut one = replica(dir.path(), "one", 1);
    let mut four = replica(dir.path(), "four", 4);
    let serial = apply_all(&mut one, &recs);

    four.apply_ahead(&recs);
    let ahead = four.ahead.len();
    assert!(ahead >= recs.len() - 2, "only {ahead} of {} ops were applied ahead", recs.len());
    assert!(four.path().join("d1/f299").exists(), "the last file was made by a lane");
    assert_eq!(four.applied(), 1, "nothing is counted before it is taken in order");
    let parallel = apply_all(&mut four, &recs);

    assert_eq!(parallel, serial);
    let refused = serial.iter().filter(|o| matches!(o, Outcome::Refused(_))).count();
    assert_eq!(refused, 3, "the file with no parent: its create, write and times");
    assert_eq!(four.applied(), recs.last().unwrap().seq);
    assert!(four.ahead.is_empty());
    assert_eq!(files_of(four.path()), files_of(one.path()));
    assert_eq!(four.commit().unwrap(), recs.last().unwrap().seq);
}

/// A process killed while a run was applied ahead and partly counted resumes at the last op
/// counted; the run applied again gives exactly the tree of one uninterrupted pass.
#[test]
fn a_run_cut_short_by_a_kill_is_applied_again_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let recs = new_files(200, 3000);
    let mut one = replica(dir.path(), "one", 1);
    apply_all(&mut one, &recs);
    for counted in [0, 1, 299, 300, 301, 450] {
        let name = format!("cut{counted}");
        let mut r = replica(dir.path(), &name, 4);
        r.apply_ahead(&recs);
        for rec in &recs[..counted] {
            r.apply(rec).unwrap();
        }
        let (root, state) = (r.path().to_path_buf(), dir.path().join(format!("{name}.state")));
        drop(r); // a kill: no commit
        let mut r = Replica::open_with_history(&root, &state, None).unwrap();
        r.set_lanes(4);
        assert_eq!(r.applied(), 1 + counted as u64, "resumes after the last op counted");
        let rest: Vec<_> = recs.iter().filter(|rec| rec.seq > r.applied()).cloned().collect();
        apply_all(&mut r, &rest);
        assert_eq!(files_of(&root), files_of(one.path()), "killed after {counted} ops counted");
    }
}

/// Unmounts a file system when dropped (a failed test too).
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(at: &std::path::Path, size: &str, remount: bool) {
    let opts = if remount { format!("remount,size={size}") } else { format!("size={size}") };
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &opts, "tmpfs"])
        .arg(at)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cannot mount a small tmpfs at {} (tests run as root)", at.display());
}

/// A disk that fills while lanes apply a run: the ops they could not carry out fail as any op
/// does (no space, named), nothing is counted past them, and once there is room again the
/// rest applies and the tree is whole.
#[test]
fn a_disk_full_under_the_lanes_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    mount_tmpfs(&small, "256k", false);
    let _mounted = Mounted(small.clone());
    let recs = new_files(120, 4096);
    let mut one = replica(dir.path(), "one", 1);
    apply_all(&mut one, &recs);
    let mut r = replica_at(&small.join("tree"), &dir.path().join("small.state"), 4);
    let mut full = None;
    for i in 0..recs.len() {
        r.apply_ahead(&recs[i..]);
        match r.apply(&recs[i]) {
            Ok(_) => {}
            Err(e) if e.is_no_space() && full.is_none() => {
                full = Some((recs[i].seq, e.to_string()));
                assert_eq!(r.applied(), recs[i].seq - 1, "nothing counted past the op that failed");
                mount_tmpfs(&small, "8m", true);
                r.apply(&recs[i]).unwrap();
            }
            Err(e) => panic!("op {} failed: {e}", recs[i].seq),
        }
    }
    let (_, error) = full.expect("the small disk never filled");
    assert!(error.contains("No space left on device"), "{error}");
    assert_eq!(files_of(r.path()), files_of(one.path()));
}
