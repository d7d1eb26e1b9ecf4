use std::os::unix::fs::FileExt;
use std::sync::Arc;

use doppel_proto::{Op, OpRecord, RenameFlags, WirePath};

use super::*;
use crate::{ApplyError, Outcome, Replica};

const MIB: u64 = 1 << 20;

#[test]
fn the_check_refuses_only_what_would_cross_a_limit() {
    let u = |bytes, files| Usage { bytes, files };
    let lim = Limits { bytes: Some(10 * MIB), files: Some(100) };
    let table: [(&str, Usage, Usage, Limits, Option<Resource>); 7] = [
        ("fits", u(5 * MIB, 50), u(MIB, 1), lim, None),
        ("exactly at the limit fits", u(9 * MIB, 99), u(MIB, 1), lim, None),
        ("one byte over", u(9 * MIB, 10), u(MIB + 1, 0), lim, Some(Resource::Bytes)),
        ("one file over", u(0, 100), u(0, 1), lim, Some(Resource::Files)),
        ("at the limit, an op that adds nothing passes", u(20 * MIB, 500), u(0, 0), lim, None),
        ("no limits", u(u64::MAX / 2, u64::MAX / 2), u(u64::MAX / 2, 1), Limits::default(), None),
        ("files are checked first", u(10 * MIB, 100), u(1, 1), lim, Some(Resource::Files)),
    ];
    for (name, used, need, limits, want) in table {
        assert_eq!(check(used, need, limits).err().map(|o| o.resource), want, "{name}");
    }
    let e = check(u(10 * MIB, 0), u(64 << 10, 0), lim).unwrap_err().to_string();
    assert_eq!(e, "over quota: 10.0 MiB of quota_bytes 10.0 MiB used, the next op needs 64.0 KiB more");
    let e = check(u(0, 100), u(0, 1), lim).unwrap_err().to_string();
    assert_eq!(e, "over quota: 100 of quota_files 100 used, the next op needs 1 more");
}

#[test]
fn a_write_needs_only_the_holes_it_fills_and_what_it_adds_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let f = std::fs::File::create(&path).unwrap();
    f.write_all_at(&vec![1u8; 64 << 10], 0).unwrap();
    f.set_len(MIB).unwrap(); // 64 KiB of data, then a hole to 1 MiB
    assert_eq!(new_allocation(&f, 0, 64 << 10).unwrap(), 0, "an overwrite of data");
    assert_eq!(new_allocation(&f, 0, 128 << 10).unwrap(), 64 << 10, "half data, half hole");
    assert_eq!(new_allocation(&f, 512 << 10, 4096).unwrap(), 4096, "inside the hole");
    assert_eq!(new_allocation(&f, MIB - 4096, 8192).unwrap(), 8192, "hole, then past the end");
    assert_eq!(new_allocation(&f, 2 * MIB, 100).unwrap(), 4096, "past the end, rounded to a block");
}

#[test]
fn a_walk_counts_each_inode_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("r");
    std::fs::create_dir_all(root.join("d")).unwrap();
    std::fs::write(root.join("d/a"), vec![7u8; 100 << 10]).unwrap();
    std::fs::hard_link(root.join("d/a"), root.join("b")).unwrap();
    std::os::unix::fs::symlink("d/a", root.join("l")).unwrap();
    let u = walk(&root).unwrap();
    assert_eq!(u.files, 4, "root, d, a (twice named), l");
    assert!((100 << 10..200 << 10).contains(&u.bytes), "the file's blocks once: {}", u.bytes);
}

fn w(s: &str) -> WirePath {
    WirePath(s.as_bytes().to_vec())
}

struct Rig {
    _dir: tempfile::TempDir,
    replica: Replica,
    account: Arc<Account>,
    seq: u64,
}

impl Rig {
    fn new(limits: Limits) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("replicas/s/job");
        let mut replica = Replica::open(&root, &dir.path().join("state/s/job")).unwrap();
        // The quota counts the tree; history is bounded by its own limits (its attic's names
        // would count a moved-aside inode's last tree name as not its last).
        replica.set_history(None).unwrap();
        let account = Arc::new(Account::new(vec![dir.path().join("replicas/s")], limits));
        replica.set_account(account.clone());
        Rig { _dir: dir, replica, account, seq: 0 }
    }

    fn apply(&mut self, op: Op) -> Result<Outcome, ApplyError> {
        let r = self.replica.apply(&OpRecord { seq: self.seq + 1, time_us: 0, op });
        if r.is_ok() {
            self.seq += 1;
        }
        r
    }

    fn used(&self) -> Usage {
        self.account.used().expect("counted")
    }

    fn recount(&self) -> Usage {
        walk(self.replica.path().parent().unwrap()).unwrap()
    }
}

fn over(r: Result<Outcome, ApplyError>) -> OverQuota {
    match r {
        Err(ApplyError::OverQuota { over, .. }) => over,
        other => panic!("expected over quota, got {other:?}"),
    }
}

#[test]
fn a_replica_over_its_files_quota_pauses_on_the_op_and_resumes_when_raised() {
    let mut r = Rig::new(Limits { bytes: None, files: Some(5) });
    r.apply(Op::Mkdir { path: w("d"), mode: 0o755 }).unwrap();
    // replicas/s, job, d: three inodes; two more fit.
    for n in ["d/1", "d/2"] {
        r.apply(Op::Create { path: w(n), mode: 0o644 }).unwrap();
    }
    assert_eq!(r.used().files, 5);
    let o = over(r.apply(Op::Create { path: w("d/3"), mode: 0o644 }));
    assert_eq!((o.resource, o.used, o.limit, o.need), (Resource::Files, 5, 5, 1));
    assert!(!r.replica.path().join("d/3").exists(), "nothing applied");
    assert_eq!(r.replica.applied(), 3, "the op is not skipped: the stream waits on it");
    // Ops that take nothing more still pass at the limit.
    r.apply(Op::Write { path: w("d/1"), offset: 0, data: vec![] }).unwrap();
    r.account.set_limits(Limits { bytes: None, files: Some(6) });
    r.apply(Op::Create { path: w("d/3"), mode: 0o644 }).unwrap();
    assert!(r.replica.path().join("d/3").exists());
    assert_eq!(r.used(), r.recount(), "the running count is what a walk finds");
}

#[test]
fn at_the_bytes_limit_overwrites_and_removals_go_on_and_growth_waits() {
    let mut r = Rig::new(Limits { bytes: Some(MIB), files: None });
    r.apply(Op::Create { path: w("f"), mode: 0o644 }).unwrap();
    r.apply(Op::Write { path: w("f"), offset: 0, data: vec![1; 600 << 10] }).unwrap();
    r.apply(Op::Create { path: w("g"), mode: 0o644 }).unwrap();
    let o = over(r.apply(Op::Write { path: w("g"), offset: 0, data: vec![2; 600 << 10] }));
    assert_eq!(o.resource, Resource::Bytes);
    assert!(o.used >= 600 << 10 && o.need == 600 << 10, "{o:?}");
    // An overwrite of allocated bytes needs nothing: it passes at the limit.
    r.account.set_limits(Limits { bytes: Some(610 << 10), files: None });
    r.apply(Op::Write { path: w("f"), offset: 4096, data: vec![3; 500 << 10] }).unwrap();
    // A truncate to a terabyte allocates nothing.
    r.apply(Op::Truncate { path: w("f"), size: 1 << 40 }).unwrap();
    assert_eq!(r.used(), r.recount());
    r.account.set_limits(Limits { bytes: Some(MIB), files: None });
    // Removing f frees its blocks: now g fits.
    r.apply(Op::Unlink { path: w("f") }).unwrap();
    assert!(r.used().bytes < 64 << 10, "{:?}", r.used());
    r.apply(Op::Write { path: w("g"), offset: 0, data: vec![2; 600 << 10] }).unwrap();
    assert_eq!(r.used(), r.recount());
}

#[test]
fn renames_links_and_replays_count_what_they_change() {
    let mut r = Rig::new(Limits { bytes: Some(100 * MIB), files: Some(1000) });
    for n in ["a", "b"] {
        r.apply(Op::Create { path: w(n), mode: 0o644 }).unwrap();
        r.apply(Op::Write { path: w(n), offset: 0, data: vec![9; 256 << 10] }).unwrap();
    }
    r.apply(Op::Link { path: w("a2"), existing: w("a") }).unwrap();
    assert_eq!(r.used(), r.recount(), "a link adds a name, not an inode");
    // Rename b over a: a's inode keeps its other name, so nothing is freed.
    r.apply(Op::Rename { from: w("b"), to: w("a"), flags: RenameFlags::default() }).unwrap();
    assert_eq!(r.used(), r.recount());
    // Rename a (was b) over a2 (the last name of the old a): that inode is freed.
    r.apply(Op::Rename { from: w("a"), to: w("a2"), flags: RenameFlags::default() }).unwrap();
    assert_eq!(r.used(), r.recount());
    // A replay after a kill: the op took effect before the process died (here: by hand), the
    // new process counts the tree afresh, and the op applied again counts nothing.
    let f = std::fs::File::create(r.replica.path().join("c")).unwrap();
    f.write_all_at(&[5; 8192], 0).unwrap();
    r.account = Arc::new(Account::new(vec![r._dir.path().join("replicas/s")], r.account.limits()));
    r.replica.set_account(r.account.clone());
    r.apply(Op::Create { path: w("c"), mode: 0o644 }).unwrap();
    r.apply(Op::Write { path: w("c"), offset: 0, data: vec![5; 8192] }).unwrap();
    assert_eq!(r.used(), r.recount());
    r.apply(Op::Rmdir { path: w("nonexistent") }).unwrap();
    assert_eq!(r.used(), r.recount());
}

#[test]
fn without_a_limit_nothing_is_walked_or_measured() {
    let r = Rig::new(Limits::default());
    assert_eq!(r.account.used(), None);
    r.account.ensure_counted().unwrap();
    assert_eq!(r.account.used(), None, "no limit: no walk");
    r.account.set_limits(Limits { bytes: Some(1), files: None });
    r.account.ensure_counted().unwrap();
    assert!(r.account.used().is_some_and(|u| u.files == 2), "a limit set later counts then");
}
