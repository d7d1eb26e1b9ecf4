//! The fuse capture mode against real files: operations made through the mount become ops
//! that, applied to an empty replica, reproduce the tree exactly.

use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use doppel_capture::fuse::{CaptureSink, Dirty, FuseCapture, FuseOptions};
use doppel_proto::{Op, OpRecord};
use doppel_testkit::{Compare, Tree, compare_trees, noise};
use parking_lot::Mutex;

/// Records ops in sequence order; counts dirty marks.
#[derive(Default)]
struct Recorder {
    ops: Mutex<Vec<Op>>,
    marks: AtomicU64,
}

impl CaptureSink for Recorder {
    type Prepared = ();
    fn prepare(&self, dirty: &[Dirty<'_>]) -> std::io::Result<()> {
        self.marks.fetch_add(dirty.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    fn commit(&self, _p: (), ops: Vec<Op>) -> std::io::Result<u64> {
        let mut v = self.ops.lock();
        v.extend(ops);
        Ok(v.len() as u64)
    }
    fn barrier(&self, _seq: u64) {}
}

fn fuse_available() -> bool {
    if !Path::new("/dev/fuse").exists() || !rustix::process::geteuid().is_root() {
        eprintln!("skipping: the fuse capture tests need root and /dev/fuse");
        return false;
    }
    true
}

fn replay(ops: &[Op], replica: &Path, state: &Path) {
    let mut r = doppel_apply::Replica::open(replica, state).unwrap();
    for (i, op) in ops.iter().enumerate() {
        let out = r.apply(&OpRecord { seq: i as u64 + 1, time_us: 0, op: op.clone() }).unwrap();
        assert_eq!(out, doppel_apply::Outcome::Applied, "op {i}: {op:?}");
    }
}

#[test]
fn every_operation_through_the_mount_replays_exactly() {
    if !fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::canonicalize(dir.path()).unwrap().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let sink = Arc::new(Recorder::default());
    let mount = FuseCapture::mount(&src, sink.clone(), FuseOptions::default()).unwrap();
    assert!(doppel_capture::fuse::mounts::doppel_mounts().contains(&src), "mounted over the source");
    let t = Tree::at(&src);
    // Through the mount: all of these go through the daemon.
    t.standard();
    let big = noise(3, 3 << 20);
    t.file("big", &big);
    let f = std::fs::OpenOptions::new().write(true).open(src.join("big")).unwrap();
    f.write_all_at(b"overwrite in place", 1_000_000).unwrap();
    f.set_len(2_500_000).unwrap();
    drop(f);
    let mut a = std::fs::OpenOptions::new().append(true).open(src.join("a.txt")).unwrap();
    a.write_all(b"appended\n").unwrap();
    drop(a);
    std::fs::rename(src.join("dir1/sub"), src.join("moved")).unwrap();
    std::fs::rename(src.join("big"), src.join("moved/big-renamed")).unwrap();
    std::fs::remove_file(src.join("empty")).unwrap();
    std::fs::remove_dir(src.join("emptydir")).unwrap();
    std::fs::set_permissions(src.join("dir2/e"), std::fs::Permissions::from_mode(0o604)).unwrap();
    rustix::fs::chown(
        src.join("a.txt").as_path(),
        Some(rustix::fs::Uid::from_raw(1234)),
        Some(rustix::fs::Gid::from_raw(5678)),
    )
    .unwrap();
    rustix::fs::mkfifoat(rustix::fs::CWD, src.join("fifo").as_path(), rustix::fs::Mode::from_raw_mode(0o640))
        .unwrap();
    xattr_set(&src.join("dir2/e"), "user.note", b"kept");
    t.file("x/y/z/deep", b"deep").hardlink("x/link-to-deep", "x/y/z/deep");
    t.mtime("x/y/z/deep", 1_234_567_890);
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        src.join("a.txt").as_path(),
        rustix::fs::CWD,
        src.join("dir2/e").as_path(),
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .unwrap();
    // Reads through the mount see what was written.
    assert_eq!(
        &std::fs::read(src.join("moved/big-renamed")).unwrap()[1_000_000..1_000_018],
        b"overwrite in place"
    );
    drop(mount);
    assert!(!doppel_capture::fuse::mounts::doppel_mounts().contains(&src), "unmounted on drop");
    let ops = sink.ops.lock().clone();
    assert!(
        ops.iter()
            .any(|o| matches!(o, Op::Write { data, offset: 1_000_000, .. } if data == b"overwrite in place")),
        "the in-place write was captured with its offset and bytes"
    );
    println!("{} ops captured", ops.len());
    assert!(sink.marks.load(Ordering::Relaxed) > 0);
    assert!(ops.iter().any(|o| matches!(o, Op::Rename { flags, .. } if flags.exchange)), "exchange captured");
    let replica = dir.path().join("replica");
    replay(&ops, &replica, &dir.path().join("state"));
    compare_trees(&src, &replica, Compare::default()).unwrap();
}

fn xattr_set(p: &Path, name: &str, value: &[u8]) {
    rustix::fs::setxattr(p, name, value, rustix::fs::XattrFlags::empty()).unwrap();
}
