//! Hypervisor capture of a real guest (`doppel protect --vm`): the VM kit's guest appends
//! records with `fdatasync` and commits SQLite transactions, each acknowledged on its serial
//! line only once it returned, while doppel replicates its disk through QEMU's active mirror to
//! a remote target behind a proxy. doppel is SIGKILLed and restarted mid-stream, and the link is
//! cut: at every cut a copy of the replica image boots to a clean file system holding a prefix of
//! the records (every acknowledged one in sync mode); the guest never stops for more than the
//! sync timeout; the replica converges afterwards without a full copy, to the guest's exact disk.

mod common;
#[path = "common/vm.rs"]
mod vm_common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use doppel_testkit::vm::{Boot, CheckReport, Console, Format, Guest, Mode, VmKit};
use doppel_testkit::{Proxy, require_ok, wait_until};

/// Under TCG a guest is slow: waits are generous.
const LONG: Duration = Duration::from_secs(240);
const IMAGE: u64 = 128 << 20;

struct Rig {
    _dir: tempfile::TempDir,
    base: PathBuf,
    kit: VmKit,
    format: Format,
    img: PathBuf,
    qmp: PathBuf,
    home: PathBuf,
    target: TargetProc,
    proxy: Proxy,
    sync: bool,
    /// `RUN_DIR` of the failover scripts and the DR VM's console.
    run: PathBuf,
    dr_serial: PathBuf,
}

impl Drop for Rig {
    fn drop(&mut self) {
        vm_common::kill_dr_vm(&self.run, "vm1");
        // A guest killed while its disk's view was mounted leaves a dead mount behind.
        detach_stale_mount(&self.home.join("vm/vm1/disk0.raw"));
    }
}

impl Rig {
    fn new(kit: VmKit, format: Format, sync: bool) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let img = base.join(format!("disk.{}", format.extension()));
        kit.make_disk_with_noise(&img, format, IMAGE, 11).unwrap();
        let home = base.join("source-home");
        let sid = init(&home);
        let (run, dr_serial) = (base.join("run"), base.join("dr-console.log"));
        std::fs::create_dir_all(&run).unwrap();
        // The shipped script boots the VM from the replica's image (the only *.raw there).
        let start = vm_common::start_vm_command(&kit, "vm1", &run, Mode::Serve, &dr_serial);
        let config = format!(
            "[[target.allow]]\nname = \"s\"\nid = \"{sid}\"\npolicy = \"manual\"\nfailover = [\"{start}\"]\n"
        );
        let target = start_target_config(&base, &config, "127.0.0.1:0", &base.join("data"), None);
        let proxy = Proxy::start(&target.addr);
        let qmp = base.join("guest.qmp");
        Rig { _dir: dir, base, kit, format, img, qmp, home, target, proxy, sync, run, dr_serial }
    }

    fn boot(&self) -> Guest {
        let mut b = Boot::new(&self.img, self.format, Mode::Mixed);
        b.qmp_socket = Some(self.qmp.clone());
        self.kit.boot(b).unwrap()
    }

    fn replica(&self) -> PathBuf {
        self.target.data.join("replicas/s/vm1/disk0.raw")
    }

    /// Starts `doppel protect --vm` and waits until it replicates.
    fn protect(&self, log: &str) -> Proc {
        let mut argv = vec!["protect", "--vm", self.qmp.to_str().unwrap(), "--name", "vm1"];
        argv.extend_from_slice(&[
            "--to",
            self.proxy.addr(),
            "--target-id",
            &self.target.id,
            "--heartbeat",
            "1",
        ]);
        if self.sync {
            argv.extend_from_slice(&["--sync", "--sync-timeout", "5"]);
        }
        let mut p = Proc::start(&self.home, log, &argv);
        wait_until(Duration::from_secs(120), "the agent to replicate", || {
            assert!(p.running(), "agent exited: {}", p.log());
            let s = job_status(&self.home, "vm1");
            (s["connected"] == true && s["state"] == "replicating").then_some(()).ok_or(s.to_string())
        });
        p
    }

    /// What a VM booted from a copy of the replica image, as it is now, finds.
    fn check_replica(&self, name: &str) -> CheckReport {
        let copy = self.base.join(format!("{name}.raw"));
        std::fs::copy(self.replica(), &copy).unwrap();
        let r = self.kit.check(&copy, Format::Raw).unwrap();
        let _ = std::fs::remove_file(&copy);
        println!("{name}: the replica's VM finds {r:?}");
        assert!(r.clean, "{name}: the replica's file system is damaged:\n{}", r.fsck_output);
        assert_eq!(r.record_tail, 0, "{name}: the replica's records are not a prefix: {r:?}");
        assert!(r.sqlite_ok(), "{name}: the replica's database is damaged: {r:?}");
        r
    }

    /// The guest's disk as raw bytes (QEMU holds it: read without taking its lock).
    fn guest_disk(&self) -> Vec<u8> {
        let out = self.base.join("guest-disk.raw");
        let st = std::process::Command::new("qemu-img")
            .args(["convert", "-U", "-f", self.format.as_str(), "-O", "raw"])
            .arg(&self.img)
            .arg(&out)
            .status()
            .unwrap();
        assert!(st.success());
        let b = std::fs::read(&out).unwrap();
        let _ = std::fs::remove_file(&out);
        b
    }

    /// Pauses the guest's CPUs (no more writes), then waits until the replica equals its disk.
    fn pause_and_converge(&self, agent: &mut Proc) {
        let mut q = doppel_capture::vm::Qmp::connect(&self.qmp, Duration::from_secs(10)).unwrap();
        q.execute("stop", serde_json::json!({})).unwrap();
        let want = self.guest_disk();
        wait_until(Duration::from_secs(120), "the replica image to equal the guest's disk", || {
            assert!(agent.running(), "agent exited: {}", agent.log());
            let got = std::fs::read(self.replica()).map_err(|e| e.to_string())?;
            (got == want).then_some(()).ok_or_else(|| {
                format!("first difference at {:?}", got.iter().zip(&want).position(|(a, b)| a != b))
            })
        });
    }
}

fn kit() -> Option<VmKit> {
    if !doppel_testkit::qsd::available() {
        return None;
    }
    require_ok(VmKit::get())
}

/// Asserts the replica holds every record and commit acknowledged before a cut (sync mode).
fn holds_all(r: &CheckReport, acked: u64, committed: u64, when: &str) {
    assert!(
        r.last_record >= acked,
        "{when}: record {acked} was acknowledged in sync mode, the replica has {}",
        r.last_record
    );
    assert!(
        r.sqlite_rows >= committed,
        "{when}: commit {committed} was acknowledged, the replica has {} rows",
        r.sqlite_rows
    );
}

#[test]
fn sync_mode_every_acknowledged_write_survives_a_killed_doppel_and_a_cut_link() {
    let Some(kit) = kit() else { return };
    let t = Instant::now();
    let rig = Rig::new(kit, Format::Raw, true);
    let mut guest = rig.boot();
    guest.wait_acks(1, LONG).unwrap();
    let mut agent = rig.protect("agent");
    let initial = bytes_sent(&rig.home, "vm1");
    guest.wait_acks(guest.acked() + 20, LONG).unwrap();
    guest.wait_commits(guest.committed() + 5, LONG).unwrap();

    // Cut 1: doppel SIGKILLed. Everything acknowledged before is on the target.
    let (acked, committed) = (guest.acked(), guest.committed());
    agent.kill();
    let r = rig.check_replica("after-kill");
    holds_all(&r, acked, committed, "doppel killed");
    // The guest never noticed: it writes on, uncaptured.
    guest.wait_acks(acked + 10, LONG).unwrap();

    // doppel restarts: only what changed travels.
    let mut agent = rig.protect("agent2");
    let resent = bytes_sent(&rig.home, "vm1");
    guest.wait_acks(guest.acked() + 10, LONG).unwrap();

    // Cut 2: the link. Read at once: within the sync timeout nothing is acknowledged that the
    // target does not have.
    let cut = Instant::now();
    rig.proxy.cut();
    let (acked, committed) = (guest.acked(), guest.committed());
    assert!(cut.elapsed() < Duration::from_secs(2));
    // The guest goes on after the sync timeout (degraded to async), not stalled for good.
    guest.wait_acks(acked + 5, LONG).unwrap();
    let r = rig.check_replica("after-cut");
    holds_all(&r, acked, committed, "link cut");
    rig.proxy.restore();
    rig.pause_and_converge(&mut agent);
    println!(
        "sync raw: initial mirror {initial} bytes, after the kill {resent} bytes for a {IMAGE}-byte disk; {:?} in all",
        t.elapsed()
    );
    assert!(resent < IMAGE / 4, "the restart re-sent the disk: {resent} bytes");
    agent.stop();
    guest.kill();
}

#[test]
fn async_mode_qcow2_the_replica_is_a_clean_prefix_at_a_kill_converges_without_a_full_copy_and_boots_by_the_failover_script()
 {
    let Some(kit) = kit() else { return };
    let rig = Rig::new(kit, Format::Qcow2, false);
    let mut guest = rig.boot();
    guest.wait_acks(1, LONG).unwrap();
    let mut agent = rig.protect("agent");
    guest.wait_acks(guest.acked() + 30, LONG).unwrap();
    guest.wait_commits(guest.committed() + 5, LONG).unwrap();
    agent.kill();
    let written = guest.acked();
    let r = rig.check_replica("after-kill");
    assert!(r.last_record > 0, "the replica holds none of the records: {r:?}");
    guest.wait_acks(written + 10, LONG).unwrap();
    let mut agent = rig.protect("agent2");
    let resent = bytes_sent(&rig.home, "vm1");
    assert!(resent < IMAGE / 4, "the restart re-sent the disk: {resent} bytes");
    rig.pause_and_converge(&mut agent);
    let r = rig.check_replica("converged");
    assert!(r.last_record >= written + 10, "{r:?}");

    // The source dies; the operator fails over; start-vm.sh boots the replica's raw image.
    guest.kill();
    agent.kill();
    let th = rig.base.join("target-home");
    let (st, out, err) = run(&th, &["failover", "s"]);
    assert!(st.success(), "{out}{err}\nTARGET LOG:\n{}", rig.target.proc.log());
    let dr = Console::at(&rig.dr_serial);
    let found = dr.wait_report(LONG).unwrap();
    assert!(found.clean && found.record_tail == 0 && found.sqlite_ok(), "{found:?}");
    assert_eq!(found.last_record, r.last_record, "the failed-over VM boots the converged replica");
    wait_until(LONG, "the failed-over VM to serve writes", || {
        assert!(dr.failure().is_none(), "{}", dr.tail(20));
        (dr.acked() > found.last_record + 5).then_some(()).ok_or(dr.tail(3))
    });
}
