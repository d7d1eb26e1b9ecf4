//! The fuse capture mode against real files: operations made through the mount become ops
//! that, applied to an empty replica, reproduce the tree exactly.

use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use doppel_capture::fuse::{CaptureSink, Dirty, FuseCapture, FuseOptions};
use doppel_proto::{Op, OpRecord};
use doppel_testkit::{Compare, Tree, compare_trees, noise};
use parking_lot::{Condvar, Mutex};

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

/// Whether FUSE mounts can be made here; if not, the test is skipped, or fails under
/// `DOPPEL_TEST_STRICT=1`.
fn fuse_available() -> bool {
    doppel_testkit::require_fuse()
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
    every_operation(FuseOptions::default());
}

/// With the kernel's write-back cache, the ops still reproduce the tree exactly once the
/// mount is gone (everything written back), including data written through a shared mapping.
#[test]
fn every_operation_replays_exactly_with_the_writeback_cache() {
    every_operation(FuseOptions { writeback: true, ..FuseOptions::default() });
}

fn every_operation(opts: FuseOptions) {
    if !fuse_available() {
        return;
    }
    let (dir, src) = source_dir();
    let sink = Arc::new(Recorder::default());
    let writeback = opts.writeback;
    let mount = FuseCapture::mount(&src, sink.clone(), opts).unwrap();
    if writeback && !mount.writeback() {
        // FUSE_WRITEBACK_CACHE is in every kernel since 3.15: its absence is a failure under
        // DOPPEL_TEST_STRICT=1 like any other missing prerequisite.
        doppel_testkit::skip_or_fail("this kernel offers no FUSE write-back cache");
        return;
    }
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
    // A symlink has no attributes: an empty list, asked with or without a buffer (a size
    // reply to a call with a buffer used to read as a malformed list: EIO).
    let mut list = [0u8; 256];
    assert_eq!(rustix::fs::llistxattr(src.join("link-rel").as_path(), &mut list[..]), Ok(0));
    assert_eq!(rustix::fs::llistxattr_query(src.join("link-rel").as_path()), Ok(0));
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
    // A shared writable mapping: its pages reach the daemon when written back.
    let mapped = src.join("mapped");
    let f =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&mapped).unwrap();
    f.set_len(3 * 4096).unwrap();
    map_and_write(&f, 4096 + 10, b"through a mapping");
    drop(f);
    // Writes racing the kernel's page cache: a write, a shrinking truncate that cuts cached
    // pages, and a write past the new end.
    let mut g =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(src.join("cut")).unwrap();
    g.write_all(&noise(9, 64 << 10)).unwrap();
    g.set_len(5000).unwrap();
    g.write_all_at(b"after the cut", 9000).unwrap();
    drop(g);
    drop(mount);
    assert!(!doppel_capture::fuse::mounts::doppel_mounts().contains(&src), "unmounted on drop");
    let ops = sink.ops.lock().clone();
    // Written through, a write is captured exactly; from the write-back cache, as part of the
    // pages it changed.
    let covers = |offset: u64, data: &[u8]| {
        let at = 1_000_000u64.wrapping_sub(offset) as usize;
        if writeback {
            data.get(at..at + 18) == Some(b"overwrite in place")
        } else {
            offset == 1_000_000 && data == b"overwrite in place"
        }
    };
    assert!(
        ops.iter().any(|o| matches!(o, Op::Write { data, offset, .. } if covers(*offset, data))),
        "the in-place write was captured with its offset and bytes"
    );
    println!("{} ops captured", ops.len());
    assert!(sink.marks.load(Ordering::Relaxed) > 0);
    assert!(ops.iter().any(|o| matches!(o, Op::Rename { flags, .. } if flags.exchange)), "exchange captured");
    let replica = dir.path().join("replica");
    replay(&ops, &replica, &dir.path().join("state"));
    compare_trees(&src, &replica, Compare::default()).unwrap();
}

/// Writes `data` at `offset` of `f` through a shared mapping, then `msync`s it.
fn map_and_write(f: &std::fs::File, offset: usize, data: &[u8]) {
    use std::os::fd::AsRawFd;
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: a fresh shared mapping of a file of `len` bytes, written within bounds and
    // unmapped before returning.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        std::ptr::copy_nonoverlapping(data.as_ptr(), p.cast::<u8>().add(offset), data.len());
        assert_eq!(libc::msync(p, len, libc::MS_SYNC), 0, "msync: {}", std::io::Error::last_os_error());
        libc::munmap(p, len);
    }
}

fn xattr_set(p: &Path, name: &str, value: &[u8]) {
    rustix::fs::setxattr(p, name, value, rustix::fs::XattrFlags::empty()).unwrap();
}

/// Waits (with a deadline) until `cond` holds.
fn wait_for(what: &str, within: std::time::Duration, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Kills the child at the end of a test, whatever happens.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn stopping_with_a_file_held_open_detaches_and_keeps_capturing_until_the_drain_ends() {
    if !fuse_available() {
        return;
    }
    let (_dir, src) = source_dir();
    let sink = Arc::new(Recorder::default());
    let drain = std::time::Duration::from_secs(2);
    let mount =
        FuseCapture::mount(&src, sink.clone(), FuseOptions { drain, ..FuseOptions::default() }).unwrap();
    std::fs::write(src.join("held"), b"through the mount\n").unwrap();
    // Another process keeps a file open on the mount, and writes to it after the stop began.
    let holder = std::process::Command::new("sh")
        .arg("-c")
        .args(["exec 3>>\"$1\"; read _; echo after-detach >&3; read _", "sh"])
        .arg(src.join("held"))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut holder = Child(holder);
    wait_for("the holder to open the file", std::time::Duration::from_secs(10), || {
        doppel_capture::fuse::open_files_under(&src).iter().any(|(pid, _)| *pid == holder.0.id())
    });
    let started = std::time::Instant::now();
    let stop = std::thread::spawn(move || mount.unmount());
    wait_for("the mount to be detached", std::time::Duration::from_secs(5), || {
        !doppel_capture::fuse::mounts::doppel_mounts().contains(&src)
    });
    // Detached: the path reaches the underlying tree again at once, while the held file is
    // still served by the daemon, so its write is captured.
    assert_eq!(std::fs::read(src.join("held")).unwrap(), b"through the mount\n");
    let stdin = holder.0.stdin.as_mut().unwrap();
    stdin.write_all(b"go\n").unwrap();
    wait_for("the held file's write to be captured", std::time::Duration::from_secs(5), || {
        sink.ops.lock().iter().any(|o| matches!(o, Op::Write { data, .. } if data == b"after-detach\n"))
    });
    stop.join().unwrap().expect("the stop succeeds although a file is still open");
    let took = started.elapsed();
    assert!(took >= drain, "open files were served for the drain period (stopped after {took:?})");
    assert!(took < drain + std::time::Duration::from_secs(5), "the stop did not hang: {took:?}");
    assert_eq!(std::fs::read(src.join("held")).unwrap(), b"through the mount\nafter-detach\n");
    // After the abort, the holder's descriptor is dead rather than silently bypassing capture.
    let _ = holder.0.stdin.as_mut().unwrap().write_all(b"done\n");
    let status = holder.0.wait().unwrap();
    assert!(status.success(), "the holder exits normally: {status:?}");
}

#[test]
fn a_copy_of_the_mount_in_another_namespace_does_not_hold_the_stop() {
    if !fuse_available() {
        return;
    }
    let (dir, src) = source_dir();
    let sink = Arc::new(Recorder::default());
    let drain = std::time::Duration::from_secs(1);
    let mount =
        FuseCapture::mount(&src, sink.clone(), FuseOptions { drain, ..FuseOptions::default() }).unwrap();
    std::fs::write(src.join("f"), b"x").unwrap();
    let ready = dir.path().join("ready");
    let copy = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "unchanged", "sh", "-c", "touch \"$1\"; exec sleep 600", "sh"])
        .arg(&ready)
        .spawn();
    let Ok(copy) = copy else {
        doppel_testkit::skip_or_fail("unshare(1) is not available");
        return;
    };
    let _copy = Child(copy);
    wait_for("the namespace to exist", std::time::Duration::from_secs(10), || ready.exists());
    let started = std::time::Instant::now();
    mount.unmount().expect("the stop succeeds");
    let took = started.elapsed();
    assert!(
        took < drain + std::time::Duration::from_secs(5),
        "a namespace's copy held the stop for {took:?}"
    );
    assert!(!doppel_capture::fuse::mounts::doppel_mounts().contains(&src));
    assert_eq!(std::fs::read(src.join("f")).unwrap(), b"x", "the underlying tree is reachable");
}

/// The write-back cache reorders writes between sync points, but never across one: when
/// `fsync` returns, every byte written to the file before it was sequenced before its `Fsync`
/// op (the kernel writes the file's pages back before sending the call), and every later
/// write is sequenced after it.
#[test]
fn writeback_cache_sequences_everything_an_fsync_covers_before_it() {
    if !fuse_available() {
        return;
    }
    const FILES: u64 = 4;
    const RECORD: usize = 64;
    let (_dir, src) = source_dir();
    let sink = Arc::new(Recorder::default());
    let mount =
        FuseCapture::mount(&src, sink.clone(), FuseOptions { writeback: true, ..FuseOptions::default() })
            .unwrap();
    if !mount.writeback() {
        // FUSE_WRITEBACK_CACHE is in every kernel since 3.15: its absence is a failure under
        // DOPPEL_TEST_STRICT=1 like any other missing prerequisite.
        doppel_testkit::skip_or_fail("this kernel offers no FUSE write-back cache");
        return;
    }
    let mut files: Vec<std::fs::File> = (0..FILES)
        .map(|i| {
            std::fs::OpenOptions::new().create(true).append(true).open(src.join(format!("log{i}"))).unwrap()
        })
        .collect();
    let record = |n: u64| {
        let mut r = format!("R{n:012}").into_bytes();
        r.resize(RECORD - 1, b'.');
        r.push(b'\n');
        r
    };
    // (file, last record written before the fsync, ops sequenced when it returned)
    let mut syncs = Vec::new();
    for n in 0..3000u64 {
        let k = n % FILES;
        files[k as usize].write_all(&record(n)).unwrap();
        if n % 53 == 0 {
            files[k as usize].sync_data().unwrap();
            syncs.push((k, n, sink.ops.lock().len()));
        }
        if n % 211 == 0 {
            std::fs::write(src.join("tmp"), b"x").unwrap();
            std::fs::rename(src.join("tmp"), src.join(format!("renamed{n}"))).unwrap();
        }
    }
    drop(files);
    drop(mount);
    let ops = sink.ops.lock().clone();
    let writes = ops.iter().filter(|o| matches!(o, Op::Write { .. })).count();
    assert!(writes < 3000 / 4, "{writes} write ops for 3000 writes: the page cache did not gather them");
    // Replays the file contents op by op, keeping each file's content at each of its Fsyncs.
    let mut content: std::collections::HashMap<Vec<u8>, Vec<u8>> = Default::default();
    let mut at_sync: Vec<(Vec<u8>, usize, Vec<u8>)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Write { path, offset, data } => {
                let c = content.entry(path.0.clone()).or_default();
                let end = *offset as usize + data.len();
                if c.len() < end {
                    c.resize(end, 0);
                }
                c[*offset as usize..end].copy_from_slice(data);
            }
            Op::Truncate { path, size } => {
                content.entry(path.0.clone()).or_default().resize(*size as usize, 0)
            }
            Op::Fsync { path: Some(p) } => {
                at_sync.push((p.0.clone(), i, content.get(&p.0).cloned().unwrap_or_default()))
            }
            _ => {}
        }
    }
    for (k, n, returned_at) in syncs {
        let name = format!("log{k}").into_bytes();
        let (_, i, seen) = at_sync
            .iter()
            .rev()
            .find(|(p, i, _)| *p == name && *i < returned_at)
            .unwrap_or_else(|| panic!("no Fsync op of log{k} before its fsync returned (record {n})"));
        let expected: Vec<u8> = (0..=n).filter(|r| r % FILES == k).flat_map(record).collect();
        assert!(
            seen == &expected,
            "at the Fsync op {i} of log{k} (after record {n}) the ops held {} bytes of it, {} expected",
            seen.len(),
            expected.len()
        );
    }
    // And the whole stream reproduces the files.
    for k in 0..FILES {
        let name = format!("log{k}");
        assert_eq!(content[name.as_bytes()], std::fs::read(src.join(&name)).unwrap(), "{name}");
    }
}

/// Writing to a set-user-id file, or one with file capabilities, drops those privileges, as
/// the kernel does for any file system: on the source, and, through the ops, on the replica.
#[test]
fn writes_drop_set_id_bits_and_capabilities_on_both_sides() {
    privileges_dropped(FuseOptions::default());
}

#[test]
fn writes_drop_set_id_bits_and_capabilities_with_the_writeback_cache() {
    privileges_dropped(FuseOptions { writeback: true, ..FuseOptions::default() });
}

fn privileges_dropped(opts: FuseOptions) {
    if !fuse_available() {
        return;
    }
    let (dir, src) = source_dir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sink = Arc::new(Recorder::default());
    let mount = FuseCapture::mount(&src, sink.clone(), opts).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o777)).unwrap();
    let t = Tree::at(&src);
    t.file("suid", b"#!/bin/sh\n")
        .file("sgid", b"#!/bin/sh\n")
        .file("capped", b"\x7fELF")
        .file("root-suid", b"x");
    t.file("trunc-suid", b"long content").file("sgid-noexec", b"x");
    let modes = [
        ("suid", 0o4777),
        ("sgid", 0o2777),
        ("capped", 0o777),
        ("root-suid", 0o4755),
        ("trunc-suid", 0o4777),
        ("sgid-noexec", 0o2766),
    ];
    for (name, mode) in modes {
        std::fs::set_permissions(src.join(name), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    // A version 2 capability set (CAP_NET_BIND_SERVICE permitted), as setcap writes it.
    let mut cap = vec![0u8; 20];
    cap[..4].copy_from_slice(&0x0200_0000u32.to_le_bytes());
    cap[4..8].copy_from_slice(&(1u32 << 10).to_le_bytes());
    xattr_set(&src.join("capped"), "security.capability", &cap);
    // An unprivileged writer (no CAP_FSETID): the kernel drops the bits.
    for (name, script) in [
        ("suid", "printf more >> \"$1\""),
        ("sgid", "printf more >> \"$1\""),
        ("capped", "printf more >> \"$1\""),
        ("sgid-noexec", "printf more >> \"$1\""),
        ("trunc-suid", ": > \"$1\""),
    ] {
        let st = std::process::Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "sh", "-c", script, "sh"])
            .arg(src.join(name))
            .status()
            .unwrap();
        assert!(st.success(), "writing {name} as nobody");
    }
    // Root keeps them (CAP_FSETID), but not file capabilities.
    std::fs::OpenOptions::new().append(true).open(src.join("root-suid")).unwrap().write_all(b"y").unwrap();
    let mode = |p: &str| std::fs::symlink_metadata(src.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("suid"), 0o777, "set-user-id dropped");
    assert_eq!(mode("sgid"), 0o777, "set-group-id (with group execute) dropped");
    assert_eq!(mode("root-suid"), 0o4755, "root's write keeps set-user-id");
    assert_eq!(mode("trunc-suid"), 0o777, "a truncate drops set-user-id");
    assert_eq!(mode("sgid-noexec"), 0o766, "set-group-id of a writer outside the group is dropped");
    let mut buf = [0u8; 64];
    assert!(rustix::fs::getxattr(src.join("capped").as_path(), "security.capability", &mut buf[..]).is_err());
    assert_eq!(std::fs::read(src.join("suid")).unwrap(), b"#!/bin/sh\nmore");
    assert_eq!(std::fs::read(src.join("trunc-suid")).unwrap(), b"");
    drop(mount);
    let replica = dir.path().join("replica");
    replay(&sink.ops.lock(), &replica, &dir.path().join("state"));
    compare_trees(&src, &replica, Compare::default()).unwrap();
    assert!(
        rustix::fs::getxattr(replica.join("capped").as_path(), "security.capability", &mut buf[..]).is_err(),
        "the capability is gone on the replica too"
    );
}

/// A scratch directory and the tree to mount in it (`DIR/src`, canonical: the mount table
/// names it so).
fn source_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::canonicalize(dir.path()).unwrap().join("src");
    std::fs::create_dir_all(&src).unwrap();
    (dir, src)
}

/// A [`Recorder`] that also measures how many writes the daemon serves at once: the first
/// write holds its place (up to a deadline) until a second one arrives, so one process's
/// queued direct writes show whether the kernel sends them together or one after another.
#[derive(Default)]
struct InFlight {
    rec: Recorder,
    now: Mutex<usize>,
    most: AtomicU64,
    arrived: Condvar,
    held: AtomicBool,
}

impl CaptureSink for InFlight {
    type Prepared = bool;
    fn prepare(&self, dirty: &[Dirty<'_>]) -> std::io::Result<bool> {
        let write = dirty.iter().any(|d| matches!(d, Dirty::Extent { .. }));
        if write {
            let mut n = self.now.lock();
            *n += 1;
            self.most.fetch_max(*n as u64, Ordering::Relaxed);
            self.arrived.notify_all();
            if !self.held.swap(true, Ordering::Relaxed) {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                while *n < 2 && !self.arrived.wait_until(&mut n, deadline).timed_out() {}
            }
        }
        self.rec.prepare(dirty)?;
        Ok(write)
    }
    fn commit(&self, write: bool, ops: Vec<Op>) -> std::io::Result<u64> {
        if write {
            *self.now.lock() -= 1;
        }
        self.rec.commit((), ops)
    }
    fn barrier(&self, _seq: u64) {}
}

/// What a hypervisor with `cache=none` does to a disk image: one process with 16 direct
/// writes queued (fio, libaio). The daemon gets them together (`FUSE_ASYNC_DIO`; without it
/// each submission waits for the one before), and the ops, sequenced as their effects land,
/// still rebuild the image exactly.
#[test]
fn queued_direct_writes_reach_the_daemon_together_and_replay_exactly() {
    if !fuse_available() {
        return;
    }
    let Some([fio]) = doppel_testkit::require_tools(["fio"]) else { return };
    let (dir, src) = source_dir();
    let image = src.join("disk.img");
    std::fs::write(&image, noise(21, 8 << 20)).unwrap();
    let sink = Arc::new(InFlight::default());
    let mount = FuseCapture::mount(&src, sink.clone(), FuseOptions::default()).unwrap();
    let out = std::process::Command::new(fio)
        .args(["--name=vm", "--rw=randwrite", "--bsrange=4k-64k", "--size=8M", "--io_size=16M"])
        .args(["--ioengine=libaio", "--direct=1", "--iodepth=16", "--randrepeat=0", "--numjobs=1"])
        .arg(format!("--filename={}", image.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "fio failed: {}", String::from_utf8_lossy(&out.stderr));
    let through_mount = std::fs::read(&image).unwrap();
    drop(mount);
    let most = sink.most.load(Ordering::Relaxed);
    assert!(most >= 2, "the daemon served at most {most} of 16 queued direct writes at once");
    // The replay starts from the image as it was before the mount.
    let replica = dir.path().join("replica");
    std::fs::create_dir_all(&replica).unwrap();
    std::fs::write(replica.join("disk.img"), noise(21, 8 << 20)).unwrap();
    let ops = sink.rec.ops.lock().clone();
    let writes = ops.iter().filter(|o| matches!(o, Op::Write { .. })).count();
    assert!(writes >= 256, "16 MiB of 4-64 KiB writes captured as only {writes} write ops");
    replay(&ops, &replica, &dir.path().join("state"));
    assert_eq!(std::fs::read(&image).unwrap(), through_mount, "the image changed after the unmount");
    assert!(std::fs::read(replica.join("disk.img")).unwrap() == through_mount, "the replayed image differs");
    println!("{writes} writes captured, at most {most} in the daemon at once");
}

/// A file whose last change was an `fallocate` (a preallocated database file, a disk image
/// grown with `fallocate -l`) ends with the source's modification time on the replica, not
/// the time the replica applied it: the allocation changed the source's mtime, and only a
/// write used to send it.
#[test]
fn a_file_last_changed_by_fallocate_keeps_its_mtime_on_the_replica() {
    use std::os::fd::AsRawFd;
    if !fuse_available() {
        return;
    }
    let (dir, src) = source_dir();
    let sink = Arc::new(Recorder::default());
    let mount = FuseCapture::mount(&src, sink.clone(), FuseOptions::default()).unwrap();
    std::fs::write(src.join("grown"), b"first bytes").unwrap();
    std::fs::write(src.join("punched"), vec![7u8; 64 << 10]).unwrap();
    for (name, mode, len) in
        [("grown", 0, 1 << 20), ("punched", libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 16 << 10)]
    {
        let f = std::fs::OpenOptions::new().write(true).open(src.join(name)).unwrap();
        // SAFETY: a plain system call on an open descriptor.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, 0, len) };
        assert_eq!(r, 0, "fallocate {name}: {}", std::io::Error::last_os_error());
    }
    drop(mount);
    let ops = sink.ops.lock().clone();
    let replica = dir.path().join("replica");
    // Applied once the file system's clock has moved past the source's times (it ticks
    // coarsely), as a target's would have: the replica's own clock must not show.
    let last = std::fs::metadata(src.join("punched")).unwrap().modified().unwrap();
    wait_for("the file system's clock to move on", std::time::Duration::from_secs(10), || {
        std::fs::write(dir.path().join("tick"), b"").unwrap();
        std::fs::metadata(dir.path().join("tick")).unwrap().modified().unwrap() > last
    });
    replay(&ops, &replica, &dir.path().join("state"));
    compare_trees(&src, &replica, Compare::default()).unwrap();
}
