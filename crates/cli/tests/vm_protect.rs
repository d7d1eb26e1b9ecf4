//! `doppel protect --vm`: a QEMU block layer (a `qemu-storage-daemon`, the part of QEMU that
//! holds a guest's disks) protected at the hypervisor, to a remote target over TLS. Writes
//! reach the replica image in order; a killed doppel never fails the guest's I/O and its
//! restart sends only what changed; a clean stop leaves the guest as it was; in sync mode a
//! write the guest saw complete is already in the replica, and a dead target stalls the
//! guest only for the sync timeout.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use doppel_capture::vm::Qmp;
use doppel_testkit::qsd::StorageDaemon;
use doppel_testkit::{noise, wait_until};
use serde_json::{Value, json};

fn qmp(d: &StorageDaemon, cmd: &str) -> Value {
    Qmp::connect(&d.qmp(), Duration::from_secs(10)).unwrap().execute(cmd, json!({})).unwrap()
}

fn protect_vm(t: &TargetProc, home: &Path, log: &str, d: &StorageDaemon, extra: &[&str]) -> Proc {
    let qmp = d.qmp();
    let mut argv = vec!["protect", "--vm", qmp.to_str().unwrap(), "--vm-disk", "disk0", "--name", "vm1"];
    argv.extend_from_slice(&["--to", &t.addr, "--target-id", &t.id]);
    argv.extend_from_slice(extra);
    Proc::start(home, log, &argv)
}

fn replica_image(t: &TargetProc) -> PathBuf {
    t.data.join("replicas/src/vm1/disk0.raw")
}

fn wait_image_equal(d: &StorageDaemon, replica: &Path, agent: &mut Proc) {
    let want = d.disk_bytes();
    wait_until(Duration::from_secs(120), "the replica image to equal the guest's disk", || {
        if !agent.running() {
            panic!("agent exited early; log:\n{}", agent.log());
        }
        match std::fs::read(replica) {
            Ok(got) if got == want => Ok(()),
            Ok(got) => Err(format!(
                "{} of {} bytes, first difference at {:?}",
                got.len(),
                want.len(),
                got.iter().zip(&want).position(|(a, b)| a != b)
            )),
            Err(e) => Err(e.to_string()),
        }
    });
}

#[test]
fn a_guest_disk_is_replicated_at_the_hypervisor_and_survives_kills_and_stops_without_a_full_copy() {
    if !doppel_testkit::qsd::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src_home, image) = (dir.path().join("src-home"), dir.path().join("disk.raw"));
    std::fs::write(&image, noise(7, 64 << 20)).unwrap();
    let d = StorageDaemon::start(dir.path(), &image, "raw");
    let id = init(&src_home);
    let t = start_target(dir.path(), &[("src", &id)], 0);
    let replica = replica_image(&t);

    let mut agent = protect_vm(&t, &src_home, "agent", &d, &[]);
    wait_image_equal(&d, &replica, &mut agent);
    d.write("write -P 0x11 1M 256k");
    d.write("write -P 0x12 1M 4k");
    wait_image_equal(&d, &replica, &mut agent);

    // SIGKILL: the guest writes on (its I/O does not fail), the restart sends only that.
    agent.kill();
    d.write("write -P 0x22 9M 256k");
    // That write failed the dead doppel's mirror job, which QEMU ends on its own. Nothing
    // reads the guest's disk through the daemon's NBD export until it has: QEMU 10.0.2's
    // daemon hung for good in a drain (a core spinning, its monitor silent) in one run of
    // about twenty, with such a read begun as the job ended.
    wait_until(Duration::from_secs(30), "QEMU to end the dead doppel's mirror job", || {
        let jobs = qmp(&d, "query-block-jobs");
        (jobs == json!([])).then_some(()).ok_or_else(|| jobs.to_string())
    });
    let mut agent = protect_vm(&t, &src_home, "agent2", &d, &[]);
    wait_image_equal(&d, &replica, &mut agent);
    let sent = bytes_sent(&src_home, "vm1");
    assert!(sent < 8 << 20, "after a kill only the changes travel, not the 64 MiB disk: {sent} bytes");
    let jobs = qmp(&d, "query-block-jobs");
    assert_eq!(jobs.as_array().unwrap().len(), 1, "one mirror job, the dead doppel's is gone: {jobs}");

    // A clean stop removes doppel from the guest entirely.
    assert!(agent.stop().success(), "{}", agent.log());
    assert_eq!(qmp(&d, "query-block-jobs"), json!([]), "no mirror job after a stop");
    let exports = qmp(&d, "query-block-exports");
    assert_eq!(exports.as_array().unwrap().len(), 1, "only the guest's own export is left: {exports}");
    let nodes = qmp(&d, "query-named-block-nodes");
    assert!(!nodes.to_string().contains("doppel-vm1"), "no node of doppel's is left: {nodes}");
    d.write("write -P 0x33 20M 64k");
    let mut agent = protect_vm(&t, &src_home, "agent3", &d, &[]);
    wait_image_equal(&d, &replica, &mut agent);
    assert!(bytes_sent(&src_home, "vm1") < 8 << 20);
    let status = job_status(&src_home, "vm1");
    assert!(status["capture"].as_str().unwrap_or("").starts_with("vm"), "{status}");

    // verify reads the disk through its view; damage to the replica is found and repaired.
    let (st, out, err) = run(&src_home, &["verify", "vm1"]);
    assert!(st.success() && out.contains("replica matches the source"), "{out}{err}");
    let f = std::fs::OpenOptions::new().write(true).open(&replica).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"rot", 40 << 20).unwrap();
    drop(f);
    let (st, out, _) = run(&src_home, &["verify", "vm1"]);
    assert!(!st.success() && out.contains("disk0.raw"), "verify missed the damage: {out}");
    let (st, out, err) = run(&src_home, &["verify", "vm1", "--repair"]);
    assert!(st.success(), "{out}{err}");
    wait_image_equal(&d, &replica, &mut agent);
    agent.stop();
}

#[test]
fn in_sync_mode_a_completed_guest_write_is_already_in_the_replica_and_a_dead_target_stalls_it_boundedly() {
    if !doppel_testkit::qsd::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src_home, image) = (dir.path().join("src-home"), dir.path().join("disk.qcow2"));
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("32M")
        .status()
        .unwrap();
    assert!(st.success());
    let d = StorageDaemon::start(dir.path(), &image, "qcow2");
    d.write("write -P 0x5a 0 4M");
    let id = init(&src_home);
    let mut t = start_target(dir.path(), &[("src", &id)], 0);
    let replica = replica_image(&t);
    let mut agent = protect_vm(&t, &src_home, "agent", &d, &["--sync", "--sync-timeout", "3"]);
    wait_image_equal(&d, &replica, &mut agent);
    assert_eq!(job_status(&src_home, "vm1")["sync"], "on");

    for i in 0..6u64 {
        let at = (4 + i) << 20;
        d.write(&format!("write -P {} {at} 64k", 0x40 + i));
        // No waiting: the write completed for the guest, so the target already has it.
        let f = std::fs::File::open(&replica).unwrap();
        let mut buf = vec![0u8; 65536];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, at).unwrap();
        assert!(buf.iter().all(|b| *b == 0x40 + i as u8), "write {i} acknowledged before the replica had it");
    }

    t.proc.kill();
    let started = Instant::now();
    d.write("write -P 0x77 12M 64k");
    let stalled = started.elapsed();
    assert!(stalled < Duration::from_secs(30), "a dead target stalled the guest for {stalled:?}");
    wait_until(Duration::from_secs(30), "sync mode to degrade", || {
        let s = job_status(&src_home, "vm1");
        (s["sync"] == "degraded").then_some(()).ok_or(format!("sync is {}", s["sync"]))
    });
    let started = Instant::now();
    d.write("write -P 0x78 13M 64k");
    assert!(started.elapsed() < Duration::from_secs(5), "degraded: writes no longer wait for the target");
    agent.stop();
}

#[test]
fn a_vm_job_fails_back_with_only_the_changed_blocks_and_then_protects_the_guest_again() {
    if !doppel_testkit::qsd::available() {
        return;
    }
    const SIZE: usize = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let (src_home, image) = (dir.path().join("src-home"), dir.path().join("disk.raw"));
    std::fs::write(&image, noise(8, SIZE)).unwrap();
    let mut d = StorageDaemon::start(dir.path(), &image, "raw");
    let sid = init(&src_home);
    let config = format!("[[target.allow]]\nname = \"s\"\nid = \"{sid}\"\n");
    let t = start_target_config(dir.path(), &config, "127.0.0.1:0", &dir.path().join("data"), None);
    let th = dir.path().join("target-home");
    let replica = t.data.join("replicas/s/vm1/disk0.raw");
    let mut agent = protect_vm(&t, &src_home, "agent", &d, &["--heartbeat", "1"]);
    wait_image_equal(&d, &replica, &mut agent);

    // Failover: the old source is fenced, its guest dies, the guest runs on the DR side and
    // writes 1 MiB there.
    let (st, out, err) = run(&th, &["failover", "s"]);
    assert!(st.success(), "{out}{err}");
    assert!(!agent.wait(Duration::from_secs(60)).success(), "the fenced agent kept running");
    d.kill();
    let f = std::fs::OpenOptions::new().write(true).open(&replica).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &noise(9, 1 << 20), 10 << 20).unwrap();
    drop(f);

    let mut back = protect_vm(&t, &src_home, "back", &d, &["--heartbeat", "1", "--failback"]);
    wait_until(Duration::from_secs(120), "the source to hold the replica", || {
        assert!(back.running(), "{}", back.log());
        let s = source_status(&th, "s");
        (s["jobs"][0]["failback"]["state"] == "replicating").then_some(()).ok_or(s.to_string())
    });
    let mirrored = source_status(&th, "s")["jobs"][0]["failback"]["bytes_sent"].as_u64().unwrap();
    assert!(
        mirrored > 1 << 20 && mirrored < 4 << 20,
        "failback sent {mirrored} bytes for 1 MiB changed of {SIZE}"
    );
    let (st, out, err) = run(&th, &["failback", "s"]);
    assert!(st.success(), "{out}{err}\nSOURCE LOG:\n{}", back.log());
    wait_until(Duration::from_secs(60), "the guest's image to hold the replica", || {
        assert!(back.running(), "{}", back.log());
        (std::fs::read(&image).unwrap() == std::fs::read(&replica).unwrap())
            .then_some(())
            .ok_or("not yet".to_string())
    });
    assert!(!dir.path().join("src-home/vm/vm1/disk0.raw").exists(), "the staged copy is removed");

    // The guest starts again at home: protection resumes on its own.
    d.restart();
    d.write("write -P 0x66 30M 64k");
    wait_image_equal(&d, &replica, &mut back);
    assert!(bytes_sent(&src_home, "vm1") < 8 << 20, "the resumed job re-sent the disk");
    assert_eq!(back.stop().code(), Some(0), "{}", back.log());
}

#[test]
fn a_vm_job_is_refused_clearly_when_misused_or_the_guest_is_not_there() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let (st, _, err) = run(&home, &["protect", "/srv", "--vm", "/run/q.sock", "--to", "/tmp/r"]);
    assert!(!st.success() && err.contains("cannot be used with"), "{err}");
    let (st, _, err) = run(&home, &["protect", "/srv", "--vm-disk", "disk0", "--to", "/tmp/r"]);
    assert!(!st.success() && err.contains("needs --vm"), "{err}");
    let missing = dir.path().join("no-such.qmp");
    let replica = dir.path().join("replica");
    let (st, _, err) =
        run(&home, &["protect", "--vm", missing.to_str().unwrap(), "--to", replica.to_str().unwrap()]);
    assert!(!st.success(), "{err}");
    assert!(err.contains("no-such.qmp") && err.contains("No such file"), "the error names the socket: {err}");
    assert!(err.contains("is the guest running"), "{err}");
    assert_eq!(err.matches("no-such.qmp").count(), 1, "said once: {err}");
}

#[test]
fn a_guest_that_dies_under_protection_stops_the_job_with_a_clear_reason() {
    if !doppel_testkit::qsd::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src_home, image) = (dir.path().join("src-home"), dir.path().join("disk.raw"));
    std::fs::write(&image, noise(12, 8 << 20)).unwrap();
    let mut d = StorageDaemon::start(dir.path(), &image, "raw");
    let id = init(&src_home);
    let t = start_target(dir.path(), &[("src", &id)], 0);
    let mut agent = protect_vm(&t, &src_home, "agent", &d, &[]);
    wait_image_equal(&d, &replica_image(&t), &mut agent);
    d.kill();
    let st = agent.wait(Duration::from_secs(30));
    assert!(!st.success(), "the job went on without its guest");
    let log = agent.log();
    assert!(log.contains("capture lost") && log.contains("the guest is gone"), "{log}");
    // The guest's view died with it; the next start replaces it.
    d.restart();
    let mut agent = protect_vm(&t, &src_home, "agent2", &d, &[]);
    d.write("write -P 0x5c 1M 64k");
    wait_image_equal(&d, &replica_image(&t), &mut agent);
    agent.stop();
}
