//! Whole virtual machines fail over and back, end to end: a real guest (the VM kit's kernel
//! and busybox initramfs under QEMU, `doppel_testkit::vm`) runs from a disk image inside a
//! job root protected with the fuse capture, appending records with `fdatasync` and committing
//! SQLite transactions, each acknowledged on its serial console only once it returned. The
//! source dies (QEMU and doppel SIGKILLed together, or the link cut); the target's failover
//! runs the shipped `examples/failover/start-vm.sh`, which boots the VM from the replica's
//! image; the guest checks its disk first and reports: a clean ext4 (e2fsck after the
//! journal's replay), every acknowledged record and commit (sync mode) or a prefix of them
//! (async), a sound database; then it serves writes. Failback stops that VM with
//! `stop-vm.sh`, sends home only the blocks it changed, and the VM boots at home with all of
//! them.

mod common;
#[path = "common/vm.rs"]
mod vm_common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use doppel_testkit::require_ok;
use doppel_testkit::vm::{Boot, CheckReport, Console, Format, Guest, Mode, VmKit};
use serde_json::Value;
use vm_common::*;

/// Under TCG a boot takes seconds and every guest step is slow: waits are generous.
const LONG: Duration = Duration::from_secs(240);
/// The image's size (an ext4 file system without partition table).
const IMAGE: u64 = 128 << 20;
const VM: &str = "vm1";

/// The target's event log.
fn events(target_home: &Path) -> Vec<Value> {
    let (st, out, err) = run(target_home, &["events", "--json"]);
    assert!(st.success(), "events failed: {err}");
    out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// How the source dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Death {
    /// QEMU and the agent SIGKILLed together.
    Kill,
    /// The link to the target cut; both go on running on the source.
    CutLink,
}

/// A source whose job root holds one VM image, protected with the fuse capture through a
/// proxy to a target whose failover boots the VM with `start-vm.sh`.
struct Rig {
    dir: tempfile::TempDir,
    kit: VmKit,
    format: Format,
    /// The job root (fuse-captured).
    src: PathBuf,
    /// The image in it.
    img: PathBuf,
    home: PathBuf,
    target: TargetProc,
    proxy: Proxy,
    /// `RUN_DIR` of the scripts (the DR VM's pid file).
    run: PathBuf,
    /// The DR VM's console.
    dr_serial: PathBuf,
    args: Vec<String>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        kill_dr_vm(&self.run, VM);
        detach_stale_mount(&self.src);
    }
}

impl Rig {
    /// `sync`: the agent's `--sync`; `policy`: the target's failover policy.
    fn new(kit: VmKit, format: Format, sync: bool, policy: &str) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let src = base.join("src");
        let run = base.join("run");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&run).unwrap();
        let img = src.join(format!("disk.{}", format.extension()));
        // Noise in the free blocks: a whole copy of the image would cost its size.
        kit.make_disk_with_noise(&img, format, IMAGE, 7).unwrap();
        let home = base.join("source-home");
        let sid = init(&home);
        let dr_serial = base.join("dr-console.log");
        let config = format!(
            "[[target.allow]]\nname = \"s\"\nid = \"{sid}\"\npolicy = \"{policy}\"\ninterval_secs = 1\nmissed = 3\n\
             failover = [\"{}\"]\nstop_workload = [\"{}\"]\n",
            start_vm_command(&kit, VM, &run, Mode::Serve, &dr_serial),
            stop_vm_command(VM, &run),
        );
        let target = start_target_config(&base, &config, "127.0.0.1:0", &base.join("data"), None);
        let proxy = Proxy::start(&target.addr);
        let mut args: Vec<String> = [
            "protect",
            src.to_str().unwrap(),
            "--to",
            proxy.addr(),
            "--target-id",
            &target.id,
            "--name",
            "job",
            "--capture",
            "fuse",
            "--heartbeat",
            "1",
        ]
        .map(String::from)
        .to_vec();
        if sync {
            args.extend(["--sync", "--sync-timeout", "10"].map(String::from));
        }
        Rig { dir, kit, format, src, img, home, target, proxy, run, dr_serial, args }
    }

    fn replica(&self) -> PathBuf {
        self.target.data.join("replicas/s/job")
    }

    fn target_home(&self) -> PathBuf {
        self.dir.path().join("target-home")
    }

    /// Starts the agent (with `extra` arguments) without waiting for anything.
    fn spawn_agent(&self, log: &str, extra: &[&str]) -> Proc {
        let mut argv: Vec<&str> = self.args.iter().map(String::as_str).collect();
        argv.extend_from_slice(extra);
        Proc::start(&self.home, log, &argv)
    }

    /// Starts the agent and waits until it replicates through a live capture mount.
    fn start_agent(&self, log: &str) -> Proc {
        let mut p = self.spawn_agent(log, &[]);
        wait_until(Duration::from_secs(60), "the agent to replicate", || {
            assert!(p.running(), "agent exited: {}", p.log());
            let s = job_status(&self.home, "job");
            (s["connected"] == true && s["state"] == "replicating" && capture_mount_live(&self.src))
                .then_some(())
                .ok_or(s.to_string())
        });
        p
    }

    /// Protection of the image is under way and the guest runs from it, writing records and
    /// commits: returns the agent and the guest once `records` and `commits` are
    /// acknowledged.
    fn run_guest(&self, records: u64, commits: u64) -> (Proc, Guest) {
        let mut agent = self.start_agent("agent");
        wait_converged(&self.src, &self.replica(), Duration::from_secs(120), &mut agent);
        let t = Instant::now();
        let mut guest = self.kit.boot(Boot::new(&self.img, self.format, Mode::Mixed)).unwrap();
        guest.wait_acks(1, LONG).unwrap();
        let first = t.elapsed();
        guest.wait_acks(records, LONG).unwrap();
        guest.wait_commits(commits, LONG).unwrap();
        println!(
            "source guest: first record durable {first:?} after QEMU started; {} records and {} commits after {:?}",
            guest.acked(),
            guest.committed(),
            t.elapsed()
        );
        (agent, guest)
    }

    /// Waits for the failover to be done (`failover-done`), failing at once on a failed one.
    fn wait_failover(&self) -> Value {
        let th = self.target_home();
        wait_until(Duration::from_secs(120), "the failover", || {
            let evs = events(&th);
            if let Some(f) = evs.iter().find(|e| e["kind"] == "failover-failed") {
                panic!("the failover failed: {f}\nTARGET LOG:\n{}", self.target.proc.log());
            }
            evs.into_iter()
                .find(|e| e["kind"] == "failover-done")
                .ok_or_else(|| source_status(&th, "s").to_string())
        })
    }

    /// The VM `start-vm.sh` booted from the replica: what its check found.
    fn dr_report(&self) -> (Console, CheckReport) {
        let dr = Console::at(&self.dr_serial);
        assert!(dr_vm_pid(&self.run, VM).is_some(), "start-vm.sh left no running QEMU");
        let r = dr.wait_report(LONG).unwrap();
        println!("the VM booted from the replica found {r:?}");
        assert!(r.clean, "the replica's file system is damaged:\n{}", r.fsck_output);
        assert_eq!(r.record_tail, 0, "the replica's records are not a prefix of those written: {r:?}");
        assert!(r.sqlite_ok(), "the replica's database is damaged: {r:?}");
        (dr, r)
    }

    /// The VM on the replica serves writes: records after those it found become durable.
    fn dr_serves(&self, dr: &Console, r: &CheckReport) {
        let t = Instant::now();
        wait_until(LONG, "the DR VM to write records", || {
            if let Some(f) = dr.failure() {
                panic!("the DR VM failed: {f}");
            }
            if dr_vm_pid(&self.run, VM).is_none() {
                panic!("the DR VM is gone:\n{}", dr.tail(30));
            }
            (dr.acked() >= r.last_record + 10 && dr.committed() > r.sqlite_max_id)
                .then_some(())
                .ok_or(dr.tail(3))
        });
        println!(
            "the DR VM serves: record {} and commit {} durable {:?} later",
            dr.acked(),
            dr.committed(),
            t.elapsed()
        );
    }
}

/// SIGKILLs the guest's QEMU and the agent at once, then reaps both.
fn kill_together(guest: &mut Guest, agent: &mut Proc) {
    use rustix::process::{Pid, Signal, kill_process};
    for pid in [guest.pid(), agent.child.id()] {
        let _ = kill_process(Pid::from_raw(pid as i32).unwrap(), Signal::KILL);
    }
    guest.kill();
    agent.kill();
}

fn kit() -> Option<VmKit> {
    if !fuse_available() {
        return None;
    }
    require_ok(VmKit::get())
}

/// The source dies (`death`); the target fails over (automatically, or by `doppel failover`
/// with `policy = "manual"`) and `start-vm.sh` boots the VM from the replica; returns the rig,
/// the DR VM's console and report, and what the source guest had acknowledged.
fn fail_over(format: Format, sync: bool, death: Death, auto: bool) -> (Rig, Console, CheckReport, u64) {
    let kit = kit().expect("checked by the caller");
    let rig = Rig::new(kit, format, sync, if auto { "auto" } else { "manual" });
    let (mut agent, mut guest) = rig.run_guest(40, 10);
    let died = Instant::now();
    let (acked, committed) = match death {
        Death::Kill => {
            kill_together(&mut guest, &mut agent);
            (guest.acked(), guest.committed())
        }
        Death::CutLink => {
            rig.proxy.cut();
            // Read at once: within the sync timeout (10 s) nothing is acknowledged that the
            // target has not, so everything read here must be on the replica.
            let seen = (guest.acked(), guest.committed());
            assert!(died.elapsed() < Duration::from_secs(2), "reading the console took {:?}", died.elapsed());
            seen
        }
    };
    if !auto {
        let (st, out, err) = run(&rig.target_home(), &["failover", "s"]);
        assert!(st.success(), "{out}{err}\nTARGET LOG:\n{}", rig.target.proc.log());
    }
    let done = rig.wait_failover();
    let failed_over = died.elapsed();
    let (dr, r) = rig.dr_report();
    println!(
        "{format:?} {} {death:?}: {acked} records and {committed} commits acknowledged; failover done {failed_over:?} \
         after the source died ({}), the replica's VM reported {:?} after it",
        if sync { "sync" } else { "async" },
        done["detail"],
        died.elapsed()
    );
    if sync {
        assert!(
            r.last_record >= acked,
            "record {acked} was acknowledged in sync mode, the replica has {}",
            r.last_record
        );
        assert!(
            r.sqlite_rows >= committed,
            "commit {committed} was acknowledged in sync mode, the replica has {} rows",
            r.sqlite_rows
        );
    }
    if death == Death::CutLink {
        // The cut stalls the source guest's flushes for the sync timeout at most: it goes on.
        guest.wait_acks(acked + 5, LONG).unwrap();
        println!("the source guest went on after the cut: record {}", guest.acked());
        kill_together(&mut guest, &mut agent);
    }
    if !sync {
        // A prefix of what the source wrote, never more (the source's own image, under the
        // dead mount, holds what it wrote).
        detach_stale_mount(&rig.src);
        let home = rig.kit.check(&rig.img, format).unwrap();
        println!("the source's own image: {home:?}");
        assert!(r.last_record <= home.last_record && r.sqlite_rows <= home.sqlite_rows, "{r:?} vs {home:?}");
    }
    rig.dr_serves(&dr, &r);
    (rig, dr, r, acked)
}

#[test]
fn raw_image_sync_mode_qemu_and_doppel_killed_fails_over_with_every_ack_and_fails_back_only_changed_blocks() {
    if kit().is_none() {
        return;
    }
    let t = Instant::now();
    let (rig, dr, _, _) = fail_over(Format::Raw, true, Death::Kill, true);
    let failed_over = t.elapsed();

    // Failback: the repaired source asks for its job back while the VM still runs on the DR
    // side.
    detach_stale_mount(&rig.src);
    let th = rig.target_home();
    let mut back = rig.spawn_agent("agent-back", &["--failback"]);
    wait_until(Duration::from_secs(120), "the source to hold the replica", || {
        assert!(back.running(), "{}", back.log());
        let s = source_status(&th, "s");
        (s["jobs"][0]["failback"]["state"] == "replicating").then_some(()).ok_or(s.to_string())
    });
    let mirrored = source_status(&th, "s")["jobs"][0]["failback"]["bytes_sent"].as_u64().unwrap();
    // It keeps writing meanwhile.
    let before = dr.acked();
    wait_until(LONG, "the DR VM to write on during the failback", || {
        (dr.acked() >= before + 10).then_some(()).ok_or(dr.tail(3))
    });
    let cutover = Instant::now();
    let (st, out, err) = run(&th, &["failback", "s"]);
    let cutover = cutover.elapsed();
    assert!(st.success(), "{out}{err}\nSOURCE LOG:\n{}\nTARGET LOG:\n{}", back.log(), rig.target.proc.log());
    for step in ["stop-workload", "final-sync", "unfence", "handover"] {
        assert!(out.contains(step), "{step} missing from the report:\n{out}");
    }
    assert!(dr_vm_pid(&rig.run, VM).is_none(), "stop-vm.sh left the DR VM running");
    let (dr_acked, dr_committed) = (dr.acked(), dr.committed());
    // "... (N bytes sent in all, ...": what the failback sent, from the final sync's step.
    let sent: u64 = out
        .split("bytes sent in all")
        .next()
        .and_then(|s| s.rsplit('(').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no byte count in the report:\n{out}"));
    println!(
        "failback: {mirrored} bytes mirrored before the cutover, {sent} in all for a {IMAGE}-byte image; cutover {cutover:?}; \
         the DR VM had acknowledged {dr_acked} records and {dr_committed} commits"
    );
    assert!(sent > 0, "nothing went back");
    assert!(
        sent < IMAGE / 8,
        "the failback sent {sent} bytes of a {IMAGE}-byte image: more than the changed blocks"
    );
    wait_until(Duration::from_secs(60), "protection to resume", || {
        assert!(back.running(), "{}", back.log());
        let s = job_status(&rig.home, "job");
        (s["state"] == "replicating" && capture_mount_live(&rig.src)).then_some(()).ok_or(s.to_string())
    });
    compare_trees(&rig.src, &rig.replica(), Compare::default()).unwrap();

    // The VM boots at home, through the capture again, with everything the DR VM wrote.
    let mut home = rig.kit.boot(Boot::new(&rig.img, rig.format, Mode::Serve)).unwrap();
    let r = home.console().wait_report(LONG).unwrap();
    println!("at home: {r:?}");
    assert!(r.clean, "{}", r.fsck_output);
    assert!(r.last_record >= dr_acked && r.record_tail == 0, "the DR VM acknowledged {dr_acked}: {r:?}");
    assert!(
        r.sqlite_ok() && r.sqlite_rows >= dr_committed,
        "the DR VM acknowledged commit {dr_committed}: {r:?}"
    );
    home.wait_acks(r.last_record + 5, LONG).unwrap();
    home.kill();
    assert_eq!(back.stop().code(), Some(0), "{}", back.log());
    println!("whole test {:?} (failover part {failed_over:?})", t.elapsed());
}

#[test]
fn qcow2_image_async_mode_qemu_and_doppel_killed_fails_over_to_a_prefix_by_hand() {
    if kit().is_none() {
        return;
    }
    let (_rig, _dr, r, acked) = fail_over(Format::Qcow2, false, Death::Kill, false);
    println!("async: {acked} records acknowledged, {} on the replica", r.last_record);
}

#[test]
fn raw_image_sync_mode_cut_link_fails_over_with_every_ack_while_the_source_goes_on() {
    if kit().is_none() {
        return;
    }
    fail_over(Format::Raw, true, Death::CutLink, true);
}
