//! Real workloads through the `fuse` capture mount, end to end with the real binary and an
//! embedded destination: a third-party POSIX stress (stress-ng), concurrent overlapping
//! writers (threads, dd, fio) on the same files, and an ext4 file system living in a disk
//! image inside the protected tree, written through a loop device. Each test ends with the
//! replica equal to the source (content, modes, owners, times, links); the disk-image test
//! also checks that a copy of the replica taken in the middle of the writes is a valid crash
//! image of ext4.
//!
//! Run as root with /dev/fuse (CI does); the tests skip, saying why, where the kernel lacks
//! FUSE or loop devices or a tool is not installed.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use parking_lot::Mutex;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Environment

/// The tools a test needs, once FUSE mounts can be made here; `None` (the test returns) after
/// a skip, or a failure under `DOPPEL_TEST_STRICT=1`, naming what is missing.
fn fuse_and_tools<const N: usize>(names: [&str; N]) -> Option<[PathBuf; N]> {
    if !fuse_available() {
        return None;
    }
    doppel_testkit::require_tools(names)
}

// ---------------------------------------------------------------------------------------------
// Processes with deadlines

/// A child process whose output goes to files (no pipe can fill up and block it).
struct Bg {
    child: Child,
    what: String,
    out: PathBuf,
    err: PathBuf,
}

impl Bg {
    fn spawn(mut cmd: Command, what: &str, logs: &Path) -> Bg {
        let n = SPAWNED.fetch_add(1, Ordering::Relaxed);
        let out = logs.join(format!("bg-{n}.out"));
        let err = logs.join(format!("bg-{n}.err"));
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Bg { child, what: what.to_string(), out, err }
    }

    fn output(&self) -> String {
        format!(
            "--- stdout of {}:\n{}\n--- stderr:\n{}",
            self.what,
            fs::read_to_string(&self.out).unwrap_or_default(),
            fs::read_to_string(&self.err).unwrap_or_default()
        )
    }

    /// Waits for the exit, at most `timeout` (then kills it and fails).
    fn finish(mut self, timeout: Duration) -> (ExitStatus, String) {
        let what = self.what.clone();
        let st = wait_until(timeout, &format!("{what} to finish"), || {
            self.child
                .try_wait()
                .unwrap()
                .ok_or_else(|| format!("still running; output so far:\n{}", self.output()))
        });
        let out = self.output();
        (st, out)
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        // Only the child this test started, by its own pid.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

static SPAWNED: AtomicUsize = AtomicUsize::new(0);

/// Runs a command to completion within `timeout`; fails with its output unless it exits 0.
fn must(cmd: Command, what: &str, logs: &Path, timeout: Duration) -> String {
    let (st, out) = Bg::spawn(cmd, what, logs).finish(timeout);
    assert!(st.success(), "{what} failed ({st}):\n{out}");
    out
}

fn cmd(prog: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(prog);
    c.args(args);
    c
}

// ---------------------------------------------------------------------------------------------
// The protected tree

/// One test's directories: the protected tree, the replica, the agent's home, scratch space.
struct Setup {
    dir: tempfile::TempDir,
    src: PathBuf,
    replica: PathBuf,
    home: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        // Canonical, as the agent mounts it (and as /proc/self/mountinfo names it).
        let root = fs::canonicalize(dir.path()).unwrap();
        let (src, replica, home) = (root.join("src"), root.join("replica"), root.join("home"));
        fs::create_dir_all(&src).unwrap();
        fs::create_dir_all(&home).unwrap();
        Setup { dir, src, replica, home }
    }

    fn scratch(&self, name: &str) -> PathBuf {
        let p = self.src.parent().unwrap().join(name);
        fs::create_dir_all(&p).unwrap();
        p
    }
}

/// Whether a FUSE file system is mounted at `path` (per /proc/self/mountinfo).
fn fuse_mounted_at(path: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = path.to_string_lossy();
    info.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let fstype = f.iter().position(|x| *x == "-").and_then(|i| f.get(i + 1)).copied().unwrap_or("");
        f.get(4).is_some_and(|m| *m == want) && fstype.starts_with("fuse")
    })
}

/// Lazily unmounts a capture mount the agent left behind (a failed test kills the agent with
/// SIGKILL, which cannot unmount). Declared before the agent so it is dropped after it.
struct CaptureMountGuard(PathBuf);

impl Drop for CaptureMountGuard {
    fn drop(&mut self) {
        if fuse_mounted_at(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Starts `doppel protect SRC --to REPLICA --capture fuse` and waits until the mount is live
/// and the job replicates.
fn start_fuse_agent(s: &Setup) -> Proc {
    let mut agent = Proc::start(
        &s.home,
        "agent",
        &["protect", s.src.to_str().unwrap(), "--to", s.replica.to_str().unwrap(), "--capture", "fuse"],
    );
    wait_until(Duration::from_secs(30), "the fuse job to be replicating", || {
        if !agent.running() {
            panic!("agent exited early; log:\n{}", agent.log());
        }
        let st = job_status(&s.home, "src");
        if st["state"] == "replicating" && fuse_mounted_at(&s.src) { Ok(()) } else { Err(st.to_string()) }
    });
    agent
}

/// The job's status without failing when the agent cannot answer (stopped, busy).
fn try_status(home: &Path) -> Option<Value> {
    let (st, out, _) = run(home, &["status", "--json"]);
    if !st.success() {
        return None;
    }
    let v: Value = serde_json::from_str(&out).ok()?;
    v["jobs"].as_array()?.iter().find(|j| j["job"] == "src").cloned()
}

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in status {v}"))
}

/// Waits until every captured op has been acknowledged; returns the final status.
fn wait_drained(home: &Path, timeout: Duration) -> Value {
    wait_until(timeout, "the target to acknowledge every captured op", || {
        let s = job_status(home, "src");
        if s["last_acked_seq"] == s["last_captured_seq"] && s["pending_bytes"] == 0 {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
}

/// After a clean stop: the mount is gone, and the tree underneath (what the daemon wrote)
/// equals the replica too.
fn stop_and_compare_underlying(s: &Setup, agent: &mut Proc) {
    let st = agent.stop();
    assert!(
        st.success(),
        "agent did not stop cleanly ({st}); what used {} then: {:?}; log:\n{}",
        s.src.display(),
        users_of(&s.src),
        agent.log()
    );
    assert!(!fuse_mounted_at(&s.src), "the capture mount outlived the agent");
    if let Err(e) = compare_trees(&s.src, &s.replica, Compare::default()) {
        panic!("after the stop, the underlying tree differs from the replica:\n{e}");
    }
}

/// What uses files beneath `root`: processes (open files, working directories) and loop
/// devices (backing files), for failure messages about a busy mount.
fn users_of(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for p in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let comm = fs::read_to_string(p.path().join("comm")).unwrap_or_default().trim().to_string();
        let fds = fs::read_dir(p.path().join("fd")).into_iter().flatten().flatten().map(|e| e.path());
        for link in fds.chain([p.path().join("cwd")]) {
            if let Ok(t) = fs::read_link(&link)
                && t.starts_with(root)
            {
                out.push(format!("pid {pid} ({comm}) {}: {}", link.display(), t.display()));
            }
        }
    }
    for b in fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        if let Ok(f) = fs::read_to_string(b.path().join("loop/backing_file"))
            && Path::new(f.trim()).starts_with(root)
        {
            out.push(format!("{} backed by {}", b.file_name().to_string_lossy(), f.trim()));
        }
    }
    out
}

/// Processes in whose mount namespace `dev` is still mounted (a namespace made while it was
/// mounted here keeps its own copy of the mount, and so the device, busy).
fn mounted_elsewhere(dev: &str) -> String {
    let mut seen = BTreeMap::<String, Vec<String>>::new();
    for p in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let info = fs::read_to_string(p.path().join("mountinfo")).unwrap_or_default();
        for l in info.lines().filter(|l| l.split(' ').any(|f| f == dev)) {
            let comm = fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            let ns =
                fs::read_link(p.path().join("ns/mnt")).map(|l| l.display().to_string()).unwrap_or_default();
            seen.entry(format!("{ns}: {l}")).or_default().push(format!(
                "{} ({})",
                p.file_name().to_string_lossy(),
                comm.trim()
            ));
        }
    }
    let mut out = String::from("\nmounted in these namespaces:");
    for (m, pids) in seen {
        out.push_str(&format!(
            "\n  {m}\n    pids {}",
            pids.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    out
}

/// Every task in uninterruptible sleep, with its kernel stack (for a device that will not let go).
fn blocked_tasks() -> String {
    let mut out = String::new();
    for p in fs::read_dir("/proc").into_iter().flatten().flatten() {
        for t in fs::read_dir(p.path().join("task")).into_iter().flatten().flatten() {
            let stat = fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            if stat.rsplit(')').next().and_then(|r| r.trim_start().chars().next()) == Some('D') {
                let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                let stack = fs::read_to_string(t.path().join("stack")).unwrap_or_default();
                out.push_str(&format!("{} {}{}\n", t.path().display(), comm, stack));
            }
        }
    }
    out
}

/// Prints the agent's warnings and errors, counted by message, so surprises show in the output.
fn report_log_trouble(agent: &Proc) {
    let log = agent.log();
    let mut counts = BTreeMap::<String, usize>::new();
    for l in log.lines().filter(|l| l.contains(" ERROR ") || l.contains(" WARN ")) {
        // Without the timestamp, and only the first line of a multi-line message.
        let msg = l.split_once(' ').map_or(l, |(_, m)| m).to_string();
        *counts.entry(msg).or_default() += 1;
    }
    if !counts.is_empty() {
        println!("agent log warnings/errors (count, message):");
        for (m, n) in counts {
            println!("  {n:6} {m}");
        }
    }
}

/// A small deterministic generator (xorshift); each test prints its seed.
struct Prng(u64);

impl Prng {
    fn new(seed: u64) -> Prng {
        Prng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A fresh seed, or `DOPPEL_TEST_SEED` to replay a printed one.
fn time_seed() -> u64 {
    let s = std::env::var("DOPPEL_TEST_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("random seed {s} (DOPPEL_TEST_SEED={s} replays it)");
    s
}

// ---------------------------------------------------------------------------------------------
// 1. stress-ng

#[test]
fn stress_ng_posix_run_through_the_mount_replicates_exactly() {
    let Some([stress]) = fuse_and_tools(["stress-ng"]) else { return };
    let t0 = Instant::now();
    let s = Setup::new();
    let _mount = CaptureMountGuard(s.src.clone());
    let mut agent = start_fuse_agent(&s);

    // A persistent tree, made through the mount, that must survive the stress untouched.
    Tree::at(&s.src).standard().file("keep/nested/deep/x", &noise(11, 300_000)).dir("stress");
    big_file(&s.src.join("keep/big.bin"), 24 << 20, 3);
    wait_converged(&s.src, &s.replica, Duration::from_secs(30), &mut agent);
    let before = wait_drained(&s.home, Duration::from_secs(30));
    println!("setup and persistent tree: {:?}", t0.elapsed());

    // Real POSIX churn from a third party: write/verify/unlink, directory and name thrash,
    // hard links, symlinks, chmod, fallocate (modes incl. punch hole, zero range), random
    // seeks with reads and writes.
    let temp = s.src.join("stress");
    let t1 = Instant::now();
    let args = [
        "--temp-path",
        temp.to_str().unwrap(),
        "--hdd",
        "1",
        "--hdd-bytes",
        "32M",
        "--dir",
        "1",
        "--rename",
        "1",
        "--link",
        "1",
        "--symlink",
        "1",
        "--chmod",
        "1",
        "--fallocate",
        "1",
        "--fallocate-bytes",
        "16M",
        "--seek",
        "1",
        "--seek-size",
        "16M",
        "--verify",
        "--timeout",
        "15s",
        "--metrics-brief",
    ];
    // stress-ng stops its stressors at 15 s; the margin covers their cleanup through the mount.
    let (st, out) = Bg::spawn(cmd(&stress, &args), "stress-ng", s.dir.path()).finish(Duration::from_secs(60));
    println!("stress-ng ran {:?}:\n{out}", t1.elapsed());
    assert!(st.success(), "stress-ng failed ({st}) through the capture mount:\n{out}");
    // stress-ng removed everything it made (through the mount, so on the replica too).
    let left: Vec<_> = fs::read_dir(&temp).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "stress-ng left {left:?} behind");

    let t2 = Instant::now();
    wait_converged(&s.src, &s.replica, Duration::from_secs(60), &mut agent);
    let after = wait_drained(&s.home, Duration::from_secs(30));
    println!("converged {:?} after the stress", t2.elapsed());
    let ops = num(&after, "last_acked_seq") - num(&before, "last_acked_seq");
    let bytes = num(&after, "bytes_sent") - num(&before, "bytes_sent");
    println!("the stress went through replication as {ops} ops, {bytes} bytes on the link");
    report_log_trouble(&agent);
    // Tens of thousands of name ops (dir, rename, link, symlink) and 32 MiB files written
    // and rewritten: anything under ten thousand ops means the stress bypassed the capture.
    assert!(ops >= 10_000, "only {ops} ops were replicated during the stress: {after}");
    assert!(bytes >= 1 << 20, "only {bytes} bytes were sent during the stress: {after}");
    assert_eq!(num(&after, "refused_ops"), 0, "the target refused ops: {after}\n{}", agent.log());
    // Every region the stress made hot (thousands of names and extents, most of them gone) is
    // forgotten by the activity log once acknowledged and idle (10 s), so a later unclean stop
    // would compare only what is really recent.
    let t3 = Instant::now();
    wait_until(Duration::from_secs(30), "the activity log to cool down", || {
        let st = job_status(&s.home, "src");
        if st["dirty_regions"] == 0 { Ok(()) } else { Err(st.to_string()) }
    });
    println!("activity log cooled {:?} after convergence", t3.elapsed());
    stop_and_compare_underlying(&s, &mut agent);
    println!("total {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 2. Concurrent overlapping writers

#[test]
fn concurrent_overlapping_writers_leave_identical_bytes() {
    let Some([bash, dd, fio]) = fuse_and_tools(["bash", "dd", "fio"]) else { return };
    let t0 = Instant::now();
    let s = Setup::new();
    // Files that exist before the agent starts: the initial mirror copies them.
    let files: Vec<PathBuf> = [8u64, 12, 16]
        .iter()
        .enumerate()
        .map(|(i, mib)| {
            let p = s.src.join(format!("f{i}"));
            big_file(&p, mib << 20, 100 + i as u64);
            p
        })
        .collect();
    let _mount = CaptureMountGuard(s.src.clone());
    let mut agent = start_fuse_agent(&s);
    wait_converged(&s.src, &s.replica, Duration::from_secs(30), &mut agent);
    let before = wait_drained(&s.home, Duration::from_secs(30));
    println!("initial mirror {:?}", t0.elapsed());

    let run_for = Duration::from_secs(10);
    let t1 = Instant::now();
    let deadline = t1 + run_for;

    // Two other processes on the same files, at the same time: a shell driving dd (4 KiB
    // blocks, overwrites and extensions of f1), and fio (two jobs, random 4-256 KiB writes
    // into the first 8 MiB of f2).
    let dd_loop = format!(
        "end=$((SECONDS + {secs})); n=0; while [ $SECONDS -lt $end ]; do \
           {dd} if=/dev/urandom of={f} bs=4096 seek=$((RANDOM % 4096)) count=$((RANDOM % 64 + 1)) \
              conv=notrunc status=none || exit 1; n=$((n+1)); done; echo dd runs: $n",
        secs = run_for.as_secs(),
        dd = dd.display(),
        f = files[1].display()
    );
    let dd_proc = Bg::spawn(cmd(&bash, &["-c", &dd_loop]), "dd loop", s.dir.path());
    let fio_args = [
        "--name=overlap".to_string(),
        format!("--filename={}", files[2].display()),
        "--rw=randwrite".into(),
        "--bsrange=4k-256k".into(),
        "--size=8M".into(),
        format!("--runtime={}", run_for.as_secs()),
        "--time_based".into(),
        "--numjobs=2".into(),
        "--ioengine=psync".into(),
        "--randrepeat=0".into(),
        "--group_reporting".into(),
    ];
    let fio_args: Vec<&str> = fio_args.iter().map(String::as_str).collect();
    let fio_proc = Bg::spawn(cmd(&fio, &fio_args), "fio", s.dir.path());

    // Four threads of this process: random overlapping writes of 1 B to 256 KiB anywhere in
    // the three files (a tenth of them past the end, extending), and some truncates (both
    // ways), through handles kept open and reopened now and then.
    let seed = time_seed();
    let counts = Arc::new(Mutex::new(BTreeMap::<&'static str, u64>::new()));
    let threads: Vec<_> = (0..4u64)
        .map(|n| {
            let files = files.clone();
            let counts = counts.clone();
            std::thread::spawn(move || {
                let mut rng = Prng::new(seed ^ (n + 1).wrapping_mul(0x1234_5678_9abc));
                let mut handles: Vec<Option<fs::File>> = files.iter().map(|_| None).collect();
                let mut local = BTreeMap::<&'static str, u64>::new();
                while Instant::now() < deadline {
                    let i = rng.below(files.len() as u64) as usize;
                    if handles[i].is_none() || rng.below(50) == 0 {
                        // Closing a handle releases it (the daemon sends the file's mtime).
                        handles[i] = Some(fs::OpenOptions::new().write(true).open(&files[i]).unwrap());
                        *local.entry("reopens").or_default() += 1;
                    }
                    let f = handles[i].as_ref().unwrap();
                    let size = f.metadata().unwrap().len();
                    let roll = rng.below(100);
                    if roll < 3 || size > 24 << 20 {
                        f.set_len((4 << 20) + rng.below(16 << 20)).unwrap();
                        *local.entry("truncates").or_default() += 1;
                    } else {
                        let len = 1 + rng.below(256 << 10) as usize;
                        let off = if roll < 13 { size + rng.below(1 << 20) } else { rng.below(size + 1) };
                        f.write_all_at(&noise(rng.next(), len), off).unwrap();
                        *local
                            .entry(if off + len as u64 > size { "extending writes" } else { "writes" })
                            .or_default() += 1;
                    }
                }
                let mut c = counts.lock();
                for (k, v) in local {
                    *c.entry(k).or_default() += v;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a writer thread failed");
    }
    let (dd_st, dd_out) = dd_proc.finish(Duration::from_secs(30));
    assert!(dd_st.success(), "the dd loop failed ({dd_st}):\n{dd_out}");
    let (fio_st, fio_out) = fio_proc.finish(Duration::from_secs(30));
    assert!(fio_st.success(), "fio failed ({fio_st}):\n{fio_out}");
    println!("writers ran {:?}: threads {:?}", t1.elapsed(), counts.lock());
    println!("{}", dd_out.lines().find(|l| l.starts_with("dd runs")).unwrap_or(""));
    println!(
        "{}",
        fio_out
            .lines()
            .filter(|l| l.contains("WRITE:") || l.contains("write:"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    let t2 = Instant::now();
    wait_converged(&s.src, &s.replica, Duration::from_secs(60), &mut agent);
    let after = wait_drained(&s.home, Duration::from_secs(30));
    println!(
        "converged {:?} after the writers; {} ops, {} bytes on the link",
        t2.elapsed(),
        num(&after, "last_acked_seq") - num(&before, "last_acked_seq"),
        num(&after, "bytes_sent") - num(&before, "bytes_sent")
    );
    report_log_trouble(&agent);
    assert_eq!(num(&after, "refused_ops"), 0, "the target refused ops: {after}");
    for f in &files {
        let (a, b) = (fs::read(f).unwrap(), fs::read(s.replica.join(f.file_name().unwrap())).unwrap());
        assert!(a == b, "{} differs byte-wise ({} vs {} bytes)", f.display(), a.len(), b.len());
    }
    stop_and_compare_underlying(&s, &mut agent);
    println!("total {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// 3. An ext4 disk image written through a loop device

/// A loop device attached by this test, detached when dropped.
struct LoopDev {
    dev: String,
    losetup: PathBuf,
    attached: bool,
}

impl LoopDev {
    fn attach(losetup: &Path, image: &Path, read_only: bool) -> LoopDev {
        let mut c = Command::new(losetup);
        c.arg("--find").arg("--show");
        if read_only {
            c.arg("--read-only");
        }
        let out = c.arg(image).output().unwrap();
        assert!(
            out.status.success(),
            "losetup {} failed: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        LoopDev { dev, losetup: losetup.to_path_buf(), attached: true }
    }

    fn detach(mut self) {
        self.attached = false;
        // The kernel may still hold the device for a moment after the unmount.
        wait_until(Duration::from_secs(20), &format!("losetup -d {}", self.dev), || {
            let out = Command::new(&self.losetup).arg("-d").arg(&self.dev).output().unwrap();
            if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
        });
        // `losetup -d` only marks the device for clearing at its last close; the backing file
        // is let go asynchronously. Wait until it is (it keeps a file open in the tree).
        let name = self.dev.trim_start_matches("/dev/").to_string();
        let backing = format!("/sys/block/{name}/loop/backing_file");
        wait_until(Duration::from_secs(20), &format!("{} to let its backing file go", self.dev), || {
            match fs::read_to_string(&backing) {
                Err(_) => Ok(()),
                Ok(f) => Err(format!(
                    "still backed by {} (autoclear {}); openers of {}: {:?}; blocked tasks:\n{}",
                    f.trim(),
                    fs::read_to_string(format!("/sys/block/{name}/loop/autoclear"))
                        .unwrap_or_default()
                        .trim(),
                    self.dev,
                    users_of(Path::new(&self.dev)),
                    blocked_tasks()
                ) + &mounted_elsewhere(&self.dev)),
            }
        });
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        if self.attached {
            let _ = Command::new(&self.losetup).arg("-d").arg(&self.dev).status();
        }
    }
}

/// A file system mounted by this test, unmounted when dropped.
struct Mounted {
    at: PathBuf,
    mounted: bool,
}

impl Mounted {
    fn mount(dev: &str, at: &Path, opts: &str) -> Mounted {
        fs::create_dir_all(at).unwrap();
        let mut c = Command::new("mount");
        if !opts.is_empty() {
            c.arg("-o").arg(opts);
        }
        let out = c.arg(dev).arg(at).output().unwrap();
        assert!(
            out.status.success(),
            "mount {dev} {} failed: {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Mounted { at: at.to_path_buf(), mounted: true }
    }

    fn unmount(mut self) {
        self.mounted = false;
        let out = Command::new("umount").arg(&self.at).output().unwrap();
        assert!(
            out.status.success(),
            "umount {} failed: {}",
            self.at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted && Command::new("umount").arg(&self.at).status().map(|s| !s.success()).unwrap_or(true)
        {
            let _ = Command::new("umount").arg("-l").arg(&self.at).status();
        }
    }
}

/// The agent stopped with SIGSTOP: nothing it does advances until SIGCONT, sent on drop
/// (even when the test fails in between, or an unmount would wait for it forever).
struct Frozen(rustix::process::Pid);

impl Frozen {
    fn freeze(agent: &Proc) -> Frozen {
        let pid = rustix::process::Pid::from_child(&agent.child);
        rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
        let frozen = Frozen(pid);
        // Wait until every thread has stopped (state T in /proc/PID/task/*/stat): a thread in
        // the middle of a write finishes it first.
        let tasks = format!("/proc/{}/task", pid.as_raw_nonzero());
        wait_until(Duration::from_secs(10), "every thread of the agent to stop", || {
            let running: Vec<String> = fs::read_dir(&tasks)
                .map_err(|e| e.to_string())?
                .filter_map(|t| {
                    let stat = fs::read_to_string(t.ok()?.path().join("stat")).ok()?;
                    let state = stat.rsplit(')').next()?.trim_start().chars().next()?;
                    (state != 'T').then(|| format!("{}: {state}", stat.split(' ').next().unwrap_or("?")))
                })
                .collect();
            if running.is_empty() { Ok(()) } else { Err(format!("threads not stopped: {running:?}")) }
        });
        frozen
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(self.0, rustix::process::Signal::CONT);
    }
}

/// What the writer puts in the ext4 file system: (relative path, seed, length).
fn disk_files(seed: u64) -> Vec<(String, u64, usize)> {
    let mut rng = Prng::new(seed);
    (0..600)
        .map(|i| {
            let dir = format!("d{}/e{}", i % 7, i % 5);
            let len = match rng.below(10) {
                0 => 256 * 1024 + rng.below(768 * 1024) as usize,
                1 => 0,
                _ => 1 + rng.below(48 * 1024) as usize,
            };
            (format!("{dir}/f{i:03}"), rng.next(), len)
        })
        .collect()
}

/// Runs e2fsck with `args` on `image`; returns (exit code, output).
fn e2fsck(e2fsck: &Path, args: &[&str], image: &Path) -> (i32, String) {
    let out = Command::new(e2fsck).args(args).arg(image).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// A copy of the replica image taken while the source was being written.
struct CrashCopy {
    image: PathBuf,
    /// The same copy, left untouched by the checks (kept for inspection when they fail).
    pristine: PathBuf,
    /// Files written (of the plan) when the copy was taken.
    written: usize,
    /// The last sequence the target had acknowledged before the copy.
    acked: u64,
}

/// The lines of an `e2fsck -f -y` report that are not ext4's ordinary recovery after a power
/// cut: replaying the journal, releasing orphan inodes (files deleted or truncated while open),
/// and recounting the superblock's free blocks and inodes (not kept on disk while mounted).
fn beyond_crash_recovery(report: &str) -> Vec<String> {
    const ORDINARY: [&str; 12] = [
        "e2fsck ",
        "Pass ",
        "recovering journal",
        "Clearing orphaned inode",
        "Truncating orphaned inode",
        "Free blocks count wrong (",
        "Free inodes count wrong (",
        "Fix? yes",
        "***** FILE SYSTEM WAS MODIFIED *****",
        " non-contiguous), ",
        ": clean, ",
        "Setting free ",
    ];
    report
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !ORDINARY.iter().any(|o| l.contains(o)))
        .map(String::from)
        .collect()
}

/// Checks one mid-write copy: e2fsck's crash recovery (journal replay, summary counts) is all
/// it needs, and every file fsync'ed and acknowledged before the copy is there, intact.
fn check_crash_copy(
    c: &CrashCopy,
    synced: &[(String, u64, usize, u64)],
    e2fsck_bin: &Path,
    losetup: &Path,
    mnt: &Path,
) -> Result<(), String> {
    let (code, out) = e2fsck(e2fsck_bin, &["-f", "-y"], &c.image);
    println!("e2fsck -f -y on the copy taken after {} files: exit {code}\n{out}", c.written);
    if code > 1 {
        return Err(format!(
            "the mid-write copy needed more than crash recovery (e2fsck exit {code}):\n{out}"
        ));
    }
    let unexpected = beyond_crash_recovery(&out);
    if !unexpected.is_empty() {
        return Err(format!(
            "e2fsck found damage a power cut does not cause in the mid-write copy: {unexpected:?}\n{out}"
        ));
    }
    let (code, out2) = e2fsck(e2fsck_bin, &["-f", "-n"], &c.image);
    if code != 0 {
        return Err(format!("the mid-write copy is not clean after recovery:\n{out2}"));
    }
    let durable: Vec<_> = synced.iter().filter(|(_, _, _, seq)| *seq <= c.acked).collect();
    println!(
        "{} fsync'ed files were acknowledged before the copy (seq <= {}); checking them",
        durable.len(),
        c.acked
    );
    let lo = LoopDev::attach(losetup, &c.image, true);
    let m = Mounted::mount(&lo.dev, mnt, "ro,noload");
    let mut lost = Vec::new();
    for (rel, seed, len, seq) in durable {
        match fs::read(m.at.join(rel)) {
            Ok(got) if got == noise(*seed, *len) => {}
            Ok(_) => lost.push(format!("{rel} (fsync'ed by seq {seq}) has the wrong content")),
            Err(e) => lost.push(format!("{rel} (fsync'ed by seq {seq}) is lost: {e}")),
        }
    }
    m.unmount();
    lo.detach();
    if lost.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "fsync'ed and acknowledged files are missing after recovery (acked {}): {lost:?}",
            c.acked
        ))
    }
}

#[test]
fn ext4_disk_image_written_through_a_loop_device_replicates_consistently() {
    let Some([truncate, mkfs, e2fsck_bin, losetup, cp]) =
        fuse_and_tools(["truncate", "mkfs.ext4", "e2fsck", "losetup", "cp"])
    else {
        return;
    };
    match Command::new(&losetup).arg("-f").output() {
        Ok(o) if o.status.success() => {}
        other => {
            skip_or_fail(&format!("no free loop device (`losetup -f`: {other:?})"));
            return;
        }
    }
    let t0 = Instant::now();
    let s = Setup::new();
    let logs = s.dir.path();
    let _mount = CaptureMountGuard(s.src.clone());
    let mut agent = start_fuse_agent(&s);

    // The image is made through the mount: a sparse file, then mkfs writing every inode table
    // and the journal now (no lazy initialisation running in the background later).
    let image = s.src.join("disk.img");
    must(cmd(&truncate, &["-s", "256M", image.to_str().unwrap()]), "truncate", logs, Duration::from_secs(20));
    must(
        cmd(&mkfs, &["-F", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", image.to_str().unwrap()]),
        "mkfs.ext4",
        logs,
        Duration::from_secs(60),
    );
    println!("image made {:?}", t0.elapsed());

    // Loop device and mount (guards declared after the agent's: dropped before it).
    let lo = LoopDev::attach(&losetup, &image, false);
    let mnt_dir = s.scratch("mnt");
    let mnt = Mounted::mount(&lo.dev, &mnt_dir, "");
    // Every write of mkfs and of the mount (the superblock marked in use) was sequenced before
    // mount(8) returned: a replica that has applied this far holds a mounted ext4, one behind
    // it a half-made one (a crash during mkfs, which no file system recovers from).
    let mounted_seq = num(&job_status(&s.home, "src"), "last_captured_seq");
    println!("mkfs and mount captured as ops 1..={mounted_seq}");
    if let Ok(o) =
        Command::new(&losetup).args(["--list", "--output", "NAME,DIO,BACK-FILE"]).arg(&lo.dev).output()
    {
        println!("{}", String::from_utf8_lossy(&o.stdout).trim());
    }

    // A writer fills the file system: nested directories, 600 files, ~60 MiB, one 8 MiB file
    // whose content is checked at the end; every tenth file is fsync'ed, and the sequence the
    // agent had captured when that fsync returned is recorded. After the 600 it goes on with
    // small files until told to stop, so the file system is being written at every copy below
    // however fast or slow this machine is. It starts once the replica holds the mounted file
    // system (a loaded machine may lag behind mkfs).
    wait_until(Duration::from_secs(60), "the replica to be past mkfs and the mount", || {
        let a = num(&job_status(&s.home, "src"), "last_acked_seq");
        if a >= mounted_seq { Ok(()) } else { Err(format!("acknowledged {a} < {mounted_seq}")) }
    });
    let seed = time_seed();
    let plan = disk_files(seed);
    let hashed = ("hashed/big.bin".to_string(), seed ^ 0xabcdef, 8usize << 20);
    let progress = Arc::new(AtomicUsize::new(0));
    let synced = Arc::new(Mutex::new(Vec::<(String, u64, usize, u64)>::new()));
    let writer_failed = Arc::new(AtomicBool::new(false));
    let stop_writing = Arc::new(AtomicBool::new(false));
    let writer = {
        let (root, plan, hashed) = (mnt_dir.clone(), plan.clone(), hashed.clone());
        let (progress, synced, failed, stop, home) =
            (progress.clone(), synced.clone(), writer_failed.clone(), stop_writing.clone(), s.home.clone());
        std::thread::spawn(move || {
            let guard = FailFlag(failed);
            let write = |rel: &str, seed: u64, len: usize, sync: bool| {
                let p = root.join(rel);
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                let mut f = fs::File::create(&p).unwrap();
                for (k, chunk) in noise(seed, len).chunks(1 << 20).enumerate() {
                    f.write_all(chunk).unwrap_or_else(|e| panic!("write {rel} chunk {k}: {e}"));
                }
                if sync {
                    f.sync_all().unwrap();
                    if let Some(seq) = try_status(&home).and_then(|v| v["last_captured_seq"].as_u64()) {
                        synced.lock().push((rel.to_string(), seed, len, seq));
                    }
                }
            };
            write(&hashed.0, hashed.1, hashed.2, false);
            for (i, (rel, seed, len)) in plan.iter().enumerate() {
                write(rel, *seed, *len, i % 10 == 9);
                progress.store(i + 1, Ordering::Relaxed);
            }
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 20_000 {
                write(
                    &format!("more/{:02}/m{n:05}", n % 50),
                    seed ^ n,
                    4096 + (n as usize % 7) * 1000,
                    n % 10 == 9,
                );
                n += 1;
            }
            std::mem::forget(guard);
        })
    };

    // Mid-write crash images. A copy of a file that is being written is normally torn (early
    // blocks copied before later writes, late blocks after), which no real crash produces. To
    // get an instant of the replica, the agent (capture daemon and embedded target alike) is
    // stopped with SIGSTOP while the writer and the kernel's writeback keep going: every op is
    // either applied or not (a single pwrite completes before a stop takes effect), so the
    // replica image is the source image after a prefix of the captured ops. The daemon
    // sequences each write before answering the kernel, so that prefix contains every write
    // the loop device had completed before some instant and none it had not issued: exactly
    // what the disk of a machine losing power at that instant holds, with ext4 mounted, its
    // journal busy and unflushed dirty pages lost. ext4 must recover from it by journal replay
    // (and e2fsck's fixes of the summary counts, which ext4 does not keep on disk while
    // mounted), and nothing that was fsync'ed and acknowledged may be missing.
    let mut copies = Vec::new();
    for (k, at) in [plan.len() / 4, plan.len() / 2, plan.len() * 3 / 4].into_iter().enumerate() {
        // A tight poll: the writer is fast, and the point is to catch it in the middle.
        let deadline = Instant::now() + Duration::from_secs(60);
        while progress.load(Ordering::Relaxed) < at {
            assert!(!writer_failed.load(Ordering::Relaxed), "the writer failed");
            assert!(
                Instant::now() < deadline,
                "the writer made no progress: {}",
                progress.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // At least this much (>= mounted_seq: the writer started after it) is in the copy.
        let acked = num(&job_status(&s.home, "src"), "last_acked_seq");
        let copy = s.scratch("crash").join(format!("crash-{k}.img"));
        let t = Instant::now();
        let written = {
            let _frozen = Frozen::freeze(&agent);
            let written = progress.load(Ordering::Relaxed);
            must(
                cmd(
                    &cp,
                    &[
                        "--sparse=always",
                        s.replica.join("disk.img").to_str().unwrap(),
                        copy.to_str().unwrap(),
                    ],
                ),
                "copying the replica image",
                logs,
                Duration::from_secs(30),
            );
            written
        };
        let pristine = copy.with_extension("pristine");
        must(
            cmd(&cp, &["--sparse=always", copy.to_str().unwrap(), pristine.to_str().unwrap()]),
            "keeping the copy",
            logs,
            Duration::from_secs(30),
        );
        println!(
            "crash copy {k} taken in {:?}, {written} of {} files written, replica at seq >= {acked}",
            t.elapsed(),
            plan.len()
        );
        copies.push(CrashCopy { image: copy, pristine, written, acked });
    }
    stop_writing.store(true, Ordering::Relaxed);
    writer.join().expect("the writer failed");
    assert!(!writer_failed.load(Ordering::Relaxed));
    let written_seq = num(&job_status(&s.home, "src"), "last_captured_seq");
    assert!(
        copies.iter().all(|c| c.acked < written_seq),
        "a copy was taken after the writes reached the replica: not a mid-write image"
    );

    // The finished source file system, as the kernel sees it, then a clean unmount and detach.
    must(cmd(Path::new("sync"), &["-f", mnt_dir.to_str().unwrap()]), "sync", logs, Duration::from_secs(60));
    let expected = snapshot(&mnt_dir, Compare::default());
    mnt.unmount();
    lo.detach();
    println!("writes done, unmounted and detached {:?}", t0.elapsed());

    let t2 = Instant::now();
    wait_converged(&s.src, &s.replica, Duration::from_secs(60), &mut agent);
    let after = wait_drained(&s.home, Duration::from_secs(30));
    println!("converged {:?} after the detach: {after}", t2.elapsed());
    report_log_trouble(&agent);
    assert_eq!(num(&after, "refused_ops"), 0, "the target refused ops: {after}");

    // The final replica image is a clean ext4 with the same files and contents.
    let rimg = s.replica.join("disk.img");
    let (code, out) = e2fsck(&e2fsck_bin, &["-n", "-f"], &rimg);
    assert_eq!(code, 0, "fsck of the replica image found problems:\n{out}");
    {
        let rlo = LoopDev::attach(&losetup, &rimg, true);
        let rmnt = Mounted::mount(&rlo.dev, &s.scratch("replica-mnt"), "ro,noload");
        let got = snapshot(&rmnt.at, Compare::default());
        let diffs: Vec<String> = expected
            .iter()
            .filter(|(k, v)| got.get(*k) != Some(v))
            .map(|(k, v)| format!("{k}: source {v:?} replica {:?}", got.get(k)))
            .chain(
                got.keys()
                    .filter(|k| !expected.contains_key(*k))
                    .map(|k| format!("{k}: only on the replica")),
            )
            .take(20)
            .collect();
        assert!(diffs.is_empty(), "the replica's file system differs:\n{}", diffs.join("\n"));
        assert_eq!(
            fs::read(rmnt.at.join(&hashed.0)).unwrap(),
            noise(hashed.1, hashed.2),
            "the hashed file differs on the replica"
        );
        assert!(expected.len() > plan.len(), "only {} names in the file system", expected.len());
        rmnt.unmount();
        rlo.detach();
    }

    // The mid-write copies recover like ext4 after a power cut.
    let synced = synced.lock().clone();
    for c in &copies {
        if let Err(e) = check_crash_copy(c, &synced, &e2fsck_bin, &losetup, &s.scratch("crash-mnt")) {
            let kept = std::env::temp_dir().join(format!(
                "doppel-fuse-crash-{}-{}.img",
                std::process::id(),
                c.written
            ));
            let kept = match fs::rename(&c.pristine, &kept) {
                Ok(()) => kept.display().to_string(),
                Err(err) => format!("(not kept: {err})"),
            };
            let log = agent.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
            panic!(
                "{e}\nthe copy (replica acknowledged up to seq {}) is kept as {kept}\nagent log tail:\n{}",
                c.acked,
                tail.join("\n")
            );
        }
    }
    stop_and_compare_underlying(&s, &mut agent);
    println!("total {:?}", t0.elapsed());
}

/// Raised when the thread holding it unwinds.
struct FailFlag(Arc<AtomicBool>);

impl Drop for FailFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
