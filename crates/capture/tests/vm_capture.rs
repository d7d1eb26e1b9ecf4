//! The vm capture against a real QEMU block layer: a `qemu-storage-daemon` holds the disk
//! (as QEMU holds a guest's), `qemu-io` writes to it as a guest would, and every write must
//! come out as an op, in order, while the guest's own I/O never fails because of doppel.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use doppel_capture::fuse::{CaptureSink, Dirty};
use doppel_capture::vm::{Qmp, VmCapture, VmOptions};
use doppel_proto::Op;
use doppel_testkit::qsd::StorageDaemon;
use doppel_testkit::{noise, wait_until};
use parking_lot::Mutex;
use serde_json::{Value, json};

/// Records ops; can be told to fail (a full spool, a dying doppel).
#[derive(Default)]
struct Recorder {
    ops: Mutex<Vec<Op>>,
    barriers: Mutex<Vec<u64>>,
    fail: AtomicBool,
    marks: AtomicU64,
}

impl CaptureSink for Recorder {
    type Prepared = ();
    fn prepare(&self, dirty: &[Dirty<'_>]) -> io::Result<()> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(io::Error::other("spool broken on purpose"));
        }
        self.marks.fetch_add(dirty.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    fn commit(&self, _p: (), ops: Vec<Op>) -> io::Result<u64> {
        let mut v = self.ops.lock();
        v.extend(ops);
        Ok(v.len() as u64)
    }
    fn barrier(&self, seq: u64) {
        self.barriers.lock().push(seq);
    }
}

/// The daemon holding the "guest's" disk, and where doppel's side lives.
struct Host {
    dir: PathBuf,
    daemon: StorageDaemon,
}

impl Host {
    fn start(dir: &Path, image: &[u8]) -> Host {
        std::fs::write(dir.join("disk.raw"), image).unwrap();
        Host { dir: dir.to_path_buf(), daemon: StorageDaemon::start(dir, &dir.join("disk.raw"), "raw") }
    }

    /// A guest write, through the daemon.
    fn guest(&self, cmd: &str) -> std::process::Output {
        self.daemon.io(cmd)
    }

    fn qmp(&self, cmd: &str, args: Value) -> Value {
        Qmp::connect(&self.daemon.qmp(), Duration::from_secs(10)).unwrap().execute(cmd, args).unwrap()
    }

    fn opts(&self, sync: bool) -> VmOptions {
        VmOptions {
            qmp: self.daemon.qmp(),
            disks: vec!["disk0".into()],
            disks_dir: self.dir.join("disks"),
            socket: self.dir.join("doppel.sock"),
            tag: "doppel-test".into(),
            sync,
            qmp_timeout: Duration::from_secs(10),
        }
    }
}

fn prerequisites() -> bool {
    doppel_testkit::qsd::available()
}

/// A daemon holding `image` in a fresh directory, and an empty recorder; `None` where the
/// prerequisites are missing (skipped, or failed under `DOPPEL_TEST_STRICT=1`).
fn rig(image: &[u8]) -> Option<(tempfile::TempDir, Host, Arc<Recorder>)> {
    if !prerequisites() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let host = Host::start(dir.path(), image);
    Some((dir, host, Arc::new(Recorder::default())))
}

/// The ops in a form short enough to print.
fn summary(ops: &[Op]) -> Vec<String> {
    ops.iter()
        .map(|op| match op {
            Op::Write { offset, data, .. } => format!("write {offset}+{} ={:#x}", data.len(), data[0]),
            Op::Fallocate { mode, offset, len, .. } => format!("fallocate {mode:#x} {offset}+{len}"),
            other => format!("{other:?}"),
        })
        .collect()
}

fn writes(ops: &[Op]) -> Vec<(u64, usize, u8)> {
    ops.iter()
        .filter_map(|op| match op {
            Op::Write { offset, data, .. } => Some((*offset, data.len(), data[0])),
            _ => None,
        })
        .collect()
}

#[test]
fn every_guest_write_becomes_an_op_in_order_and_detaching_leaves_the_guest_as_it_was() {
    let image = noise(1, 8 << 20);
    let Some((dir, host, sink)) = rig(&image) else { return };
    let cap = VmCapture::attach(host.opts(false), sink.clone()).unwrap();
    let view = dir.path().join("disks/disk0.raw");
    assert_eq!(std::fs::read(&view).unwrap(), image, "the raw view shows the disk as it is");

    for (i, at) in [4096u64, 1 << 20, 4096].iter().enumerate() {
        let out = host.guest(&format!("write -P {} {at} 8k", 0x10 + i));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let out = host.guest("discard 2M 64k");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ops = sink.ops.lock().clone();
    assert_eq!(
        writes(&ops),
        [(4096, 8192, 0x10), (1 << 20, 8192, 0x11), (4096, 8192, 0x12)],
        "{:?}",
        summary(&ops)
    );
    // A discard either reaches doppel as a hole punch, or (QEMU 7.2: its mirror filter node
    // is opened without `discard=unmap`) is dropped before the image too: either way the
    // replica keeps what the guest's image keeps.
    let punched = ops
        .iter()
        .any(|op| matches!(op, Op::Fallocate { offset, len, .. } if *offset == 2 << 20 && *len == 65536));
    let now = std::fs::read(&view).unwrap();
    if !punched {
        assert_eq!(
            &now[2 << 20..(2 << 20) + 65536],
            &image[2 << 20..(2 << 20) + 65536],
            "{:?}",
            summary(&ops)
        );
    }
    for op in &ops {
        assert_eq!(
            op.path().map(|p| p.display()),
            Some("disk0.raw".into()),
            "{:?}",
            summary(std::slice::from_ref(op))
        );
    }
    assert!(sink.barriers.lock().is_empty(), "async mode: no write waits for the target");
    assert_eq!(&now[4096..4096 + 8192], &[0x12u8; 8192][..], "the view shows the guest's latest bytes");

    cap.detach().unwrap();
    assert_eq!(host.qmp("query-block-jobs", json!({})), json!([]), "the mirror is gone");
    assert_eq!(
        host.qmp("query-block-exports", json!({})).as_array().unwrap().len(),
        1,
        "only the guest's own export remains"
    );
    let md = std::fs::metadata(&view);
    assert!(
        md.map_or(true, |m| m.dev() == std::fs::metadata(dir.path().join("disks")).unwrap().dev()),
        "view unmounted"
    );
    let out = host.guest("write -P 0x77 0 4k");
    assert!(out.status.success(), "the guest writes on after protection stops");
    assert_eq!(writes(&sink.ops.lock()).len(), 3, "nothing is captured after the detach");
    let disk = std::fs::read(dir.path().join("disk.raw")).unwrap();
    assert_eq!(disk[0], 0x77, "the guest still writes its own image (no pivot onto doppel)");
}

#[test]
fn sync_mode_makes_each_write_wait_for_the_target_and_closes_bursts_with_a_barrier() {
    let Some((_dir, host, sink)) = rig(&vec![0u8; 4 << 20]) else { return };
    let cap = VmCapture::attach(host.opts(true), sink.clone()).unwrap();
    let out = host.guest("write -P 0x33 0 64k");
    assert!(out.status.success());
    let ops = sink.ops.lock().clone();
    let w = ops.iter().position(|op| matches!(op, Op::Write { .. })).expect("the write");
    let f = ops.iter().rposition(|op| matches!(op, Op::Fsync { .. })).expect("a barrier closes the burst");
    assert!(f > w, "{:?}", summary(&ops));
    assert!(
        sink.barriers.lock().contains(&(w as u64 + 1)) || sink.barriers.lock().iter().any(|b| *b > w as u64),
        "the write's reply waited for the target: {:?}",
        sink.barriers.lock()
    );
    cap.detach().unwrap();
}

#[test]
fn a_failing_doppel_never_fails_the_guest_and_the_loss_is_reported() {
    let Some((dir, host, sink)) = rig(&vec![0u8; 4 << 20]) else { return };
    let cap = VmCapture::attach(host.opts(false), sink.clone()).unwrap();
    sink.fail.store(true, Ordering::Relaxed);
    let out = host.guest("write -P 0x44 0 4k");
    assert!(out.status.success(), "the guest's write succeeds: {}", String::from_utf8_lossy(&out.stderr));
    let why = wait_until(Duration::from_secs(20), "the loss of capture to be noticed", || {
        cap.lost().ok_or_else(|| "not yet".to_string())
    });
    assert!(why.contains("mirror job"), "{why}");
    assert_eq!(std::fs::read(dir.path().join("disk.raw")).unwrap()[0], 0x44);

    // A new doppel attaches again over what the failed one left.
    drop(cap);
    sink.fail.store(false, Ordering::Relaxed);
    let cap = VmCapture::attach(host.opts(false), sink.clone()).unwrap();
    let out = host.guest("write -P 0x45 4096 4k");
    assert!(out.status.success());
    assert_eq!(writes(&sink.ops.lock()), [(4096, 4096, 0x45)]);
    cap.detach().unwrap();
}

#[test]
fn a_doppel_that_died_leaves_nothing_that_stops_the_next_one() {
    let Some((dir, host, sink)) = rig(&vec![0u8; 4 << 20]) else { return };
    let cap = VmCapture::attach(host.opts(false), sink.clone()).unwrap();
    // As if killed: no detach, the NBD server's socket file gone with the process.
    std::mem::forget(cap);
    let _ = std::fs::remove_file(dir.path().join("doppel.sock"));
    let cap = VmCapture::attach(host.opts(false), sink.clone()).unwrap();
    let out = host.guest("write -P 0x46 8192 4k");
    assert!(out.status.success());
    assert!(writes(&sink.ops.lock()).contains(&(8192, 4096, 0x46)));
    assert_eq!(
        host.qmp("query-block-jobs", json!({})).as_array().unwrap().len(),
        1,
        "one mirror job, not two"
    );
    cap.detach().unwrap();
}

#[test]
fn an_unknown_disk_name_is_a_clear_error() {
    let Some((_dir, host, sink)) = rig(&vec![0u8; 1 << 20]) else { return };
    let mut opts = host.opts(false);
    opts.disks = vec!["nope".into()];
    let e = VmCapture::attach(opts, sink).err().expect("refused");
    assert!(e.to_string().contains("no disk or block node named \"nope\""), "{e}");
}

#[test]
fn writes_to_several_disks_form_one_stream_in_the_order_they_completed() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.qcow2"));
    std::fs::write(&a, vec![0u8; 4 << 20]).unwrap();
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&b)
        .arg("8M")
        .status();
    assert!(st.unwrap().success());
    let daemon = StorageDaemon::start_many(dir.path(), &[(&a, "raw"), (&b, "qcow2")]);
    let sink = Arc::new(Recorder::default());
    let opts = VmOptions {
        qmp: daemon.qmp(),
        disks: vec!["disk0".into(), "disk1".into()],
        disks_dir: dir.path().join("disks"),
        socket: dir.path().join("doppel.sock"),
        tag: "doppel-test".into(),
        sync: false,
        qmp_timeout: Duration::from_secs(10),
    };
    let cap = VmCapture::attach(opts, sink.clone()).unwrap();
    assert_eq!(
        std::fs::metadata(dir.path().join("disks/disk1.raw")).unwrap().len(),
        8 << 20,
        "a qcow2 disk's view is raw"
    );
    for (disk, pattern) in [(0, 0x61), (1, 0x62), (0, 0x63), (1, 0x64)] {
        let out = daemon.io_on(disk, &format!("write -P {pattern} 0 4k"));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let got: Vec<(String, u8)> = sink
        .ops
        .lock()
        .iter()
        .filter_map(|op| match op {
            Op::Write { path, data, .. } => Some((path.display(), data[0])),
            _ => None,
        })
        .collect();
    let want: Vec<(String, u8)> =
        [("disk0.raw", 0x61), ("disk1.raw", 0x62), ("disk0.raw", 0x63), ("disk1.raw", 0x64)]
            .map(|(p, b)| (p.to_string(), b))
            .into();
    assert_eq!(got, want);
    cap.detach().unwrap();
}
