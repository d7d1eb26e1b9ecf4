//! Breaks: the agent and the target killed with SIGKILL mid-stream, and a clean restart with
//! changes made while the agent was down. The replica must converge without a full re-mirror.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;

const BIG: u64 = 256 << 20;

/// Keeps a live workload going: 4 KiB writes at random offsets of a few small files and
/// appends to a log, about 25 times a second, until stopped.
struct Workload {
    stop: Arc<AtomicBool>,
    /// Iterations done so far.
    done: Arc<std::sync::atomic::AtomicU64>,
    handle: Option<std::thread::JoinHandle<u64>>,
}

impl Workload {
    fn start(src: &Path) -> Workload {
        let dir = src.join("live");
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..8 {
            std::fs::write(dir.join(format!("f{i}")), noise(100 + i, 256 << 10)).unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = done.clone();
        let handle = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                let f =
                    std::fs::OpenOptions::new().write(true).open(dir.join(format!("f{}", n % 8))).unwrap();
                let off = (noise(n, 8)[0] as u64 * 997) % ((256 << 10) - 4096);
                f.write_all_at(&noise(1000 + n, 4096), off).unwrap();
                let mut log =
                    std::fs::OpenOptions::new().create(true).append(true).open(dir.join("app.log")).unwrap();
                std::io::Write::write_all(&mut log, format!("record {n}\n").as_bytes()).unwrap();
                n += 1;
                counted.store(n, Ordering::Relaxed);
                // Pacing of the load generator, not a wait for a condition.
                std::thread::sleep(Duration::from_millis(40));
            }
            n
        });
        Workload { stop, done, handle: Some(handle) }
    }

    /// Waits until the workload has made more than `n` writes (however fast the rest went).
    fn wait_writes(&self, n: u64) {
        wait_until(Duration::from_secs(60), "the workload to write", || {
            let done = self.done.load(Ordering::Relaxed);
            (done > n).then_some(()).ok_or(format!("{done} writes"))
        });
    }

    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().map(|h| h.join().unwrap()).unwrap_or(0)
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    src: PathBuf,
    home: PathBuf,
    replica: PathBuf,
    target: TargetProc,
    root: PathBuf,
    watch: Watch,
}

fn rig(watch: Watch) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let home = dir.path().join("source-home");
    Tree::at(&src).standard();
    big_file(&src.join("big.img"), BIG, 3);
    let id = init(&home);
    let target = start_target(dir.path(), &[("s1", &id)], 0);
    let replica = target.data.join("replicas/s1/job");
    let root = dir.path().to_path_buf();
    Rig { _dir: dir, src, home, replica, target, root, watch }
}

fn agent(r: &Rig, log: &str) -> Proc {
    Proc::start(
        &r.home,
        log,
        &[
            "protect",
            r.src.to_str().unwrap(),
            "--to",
            &r.target.addr,
            "--target-id",
            &r.target.id,
            "--name",
            "job",
            r.watch.args()[0],
            r.watch.args()[1],
        ],
    )
}

/// Waits until the running agent has captured at least `n` more ops than `from`.
fn wait_captured(home: &Path, from: u64, n: u64) -> u64 {
    wait_until(Duration::from_secs(60), "ops to be captured", || {
        let s = job_status(home, "job");
        let c = s["last_captured_seq"].as_u64().unwrap_or(0);
        (c >= from + n).then_some(c).ok_or(s.to_string())
    })
}

with_each_watch_backend!(
    agent_and_target_killed_mid_stream_resume_without_a_full_remirror,
    clean_restart_sends_only_what_changed_while_down,
    a_source_heartbeat_shorter_than_the_targets_keeps_an_idle_link_up,
);

fn agent_and_target_killed_mid_stream_resume_without_a_full_remirror(watch: Watch) {
    let r = rig(watch);
    let mut a = agent(&r, "agent1");
    wait_converged(&r.src, &r.replica, Duration::from_secs(180), &mut a);
    let mut work = Workload::start(&r.src);
    let c = wait_captured(&r.home, 0, 0);
    wait_captured(&r.home, c, 20);

    // SIGKILL the agent mid-stream, restart it while the workload goes on.
    a.kill();
    let mut a = agent(&r, "agent2");
    wait_until(Duration::from_secs(60), "the restarted agent to connect", || {
        let s = job_status(&r.home, "job");
        (s["connected"] == true && s["state"] == "replicating").then_some(()).ok_or(s.to_string())
    });
    let c = wait_captured(&r.home, 0, 0);
    wait_captured(&r.home, c, 20);

    // SIGKILL the target mid-stream, restart it on the same address.
    let port: u16 = r.target.addr.rsplit_once(':').unwrap().1.parse().unwrap();
    let mut old_target = r.target;
    old_target.proc.kill();
    let target = start_target(&r.root, &[("s1", &init(&r.home))], port);
    wait_until(Duration::from_secs(60), "the agent to reconnect", || {
        let s = job_status(&r.home, "job");
        (s["connections"].as_u64() >= Some(2) && s["connected"] == true).then_some(()).ok_or(s.to_string())
    });
    let c = wait_captured(&r.home, 0, 0);
    wait_captured(&r.home, c, 10);
    // The workload went on across both kills (the steps above may take less than a second).
    work.wait_writes(20);
    let writes = work.stop();
    assert!(writes > 20);

    wait_converged(&r.src, &r.replica, Duration::from_secs(120), &mut a);
    let sent = bytes_sent(&r.home, "job");
    println!(
        "after the kills: the restarted agent sent {sent} bytes ({writes} workload writes); tree {BIG} bytes"
    );
    assert!(sent < BIG / 4, "the restarted agent sent {sent} bytes: a full re-mirror?");
    let log = a.log();
    assert!(log.contains("after an unclean stop"), "{log}");
    assert!(!log.contains("comparing the whole tree"), "a whole-tree comparison happened:\n{log}");
    assert!(!target.proc.log().contains("un-synced changes"), "{}", target.proc.log());
}

fn clean_restart_sends_only_what_changed_while_down(watch: Watch) {
    let r = rig(watch);
    let mut a = agent(&r, "agent1");
    wait_converged(&r.src, &r.replica, Duration::from_secs(180), &mut a);
    assert!(a.stop().success(), "{}", a.log());
    // Changes while no agent runs.
    let f = std::fs::OpenOptions::new().write(true).open(r.src.join("big.img")).unwrap();
    f.write_all_at(&noise(5, 4096), 7 << 20).unwrap();
    drop(f);
    Tree::at(&r.src).file("made-while-down", b"hello").chmod("a.txt", 0o600);
    std::fs::remove_file(r.src.join("dir2/e")).unwrap();
    let mut a = agent(&r, "agent2");
    wait_converged(&r.src, &r.replica, Duration::from_secs(60), &mut a);
    let sent = bytes_sent(&r.home, "job");
    assert!(sent < 1 << 20, "sent {sent} bytes after a clean restart");
    let log = a.log();
    assert!(log.contains("clean restart"), "{log}");
    assert!(!log.contains("comparing the whole tree"), "{log}");
}

fn a_source_heartbeat_shorter_than_the_targets_keeps_an_idle_link_up(watch: Watch) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    Tree::at(&src).standard();
    let home = dir.path().join("home");
    let id = init(&home);
    // The target sends heartbeats every 10 s; the agent expects a sign of life every 3 s.
    let th = dir.path().join("target-home");
    let tid = init(&th);
    let data = dir.path().join("data");
    let allow = format!("s={id}");
    let mut tp = Proc::start(
        &th,
        "target",
        &[
            "target",
            "--listen",
            "127.0.0.1:0",
            "--data",
            data.to_str().unwrap(),
            "--allow",
            &allow,
            "--heartbeat",
            "10",
        ],
    );
    let addr = wait_until(Duration::from_secs(30), "the target to listen", || {
        assert!(tp.running(), "{}", tp.log());
        std::fs::read_to_string(th.join("run/target.addr")).map_err(|e| e.to_string())
    });
    let mut agent = Proc::start(
        &home,
        "agent",
        &[
            "protect",
            src.to_str().unwrap(),
            "--to",
            &addr,
            "--target-id",
            &tid,
            "--name",
            "j",
            "--heartbeat",
            "1",
            watch.args()[0],
            watch.args()[1],
        ],
    );
    wait_converged(&src, &dir.path().join("data/replicas/s/j"), Duration::from_secs(60), &mut agent);
    // Idle for five of the agent's dead-peer intervals: the link must stay up all along.
    let idle = std::time::Instant::now();
    while idle.elapsed() < Duration::from_secs(15) {
        let s = job_status(&home, "j");
        assert_eq!(s["connected"], true, "the idle link dropped: {s}\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(job_status(&home, "j")["connections"], 1, "{}", agent.log());
    assert!(!agent.log().contains("presumed dead"), "{}", agent.log());
}

/// A damaged index (here: garbage in its store, `index.redb`) is set aside with a warning; the job starts,
/// compares the whole tree with the replica and sends only what differs.
#[test]
fn an_unreadable_index_never_stops_the_job_and_is_rebuilt_by_comparing() {
    let r = rig(Watch::Inotify);
    let mut a = agent(&r, "agent1");
    wait_converged(&r.src, &r.replica, Duration::from_secs(180), &mut a);
    assert!(a.stop().success(), "{}", a.log());
    let index = r.home.join("jobs/job/index.redb");
    assert!(index.exists());
    std::fs::write(&index, b"\x07garbage, not an index").unwrap();
    Tree::at(&r.src).file("made-while-down", b"hello");
    let mut a = agent(&r, "agent2");
    wait_converged(&r.src, &r.replica, Duration::from_secs(60), &mut a);
    let log = a.log();
    assert!(log.contains("the index is unreadable"), "{log}");
    assert!(log.contains("comparing the whole tree"), "{log}");
    assert!(r.home.join("jobs/job/index.redb.unreadable").exists(), "the damaged index is kept aside");
    let sent = bytes_sent(&r.home, "job");
    assert!(sent < 1 << 20, "rebuilding the index sent {sent} bytes: more than the differences");
}

/// Threads of `pid` whose name starts with `prefix`.
fn threads_named(pid: u32, prefix: &str) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

/// A target whose replica keeps no history applies a mirror's new files on several threads
/// (`apply_threads`). SIGKILLed while those threads run and restarted, it resumes at its
/// progress marker, applies the rest of the run again (each op exact to replay), and the
/// replica ends equal to the source: bytes, modes and times.
#[test]
fn a_target_killed_while_it_applies_new_files_on_several_threads_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    for d in 0..20 {
        let sub = src.join(format!("d{d:02}"));
        std::fs::create_dir_all(&sub).unwrap();
        for i in 0..1000 {
            let f = sub.join(format!("f{i:04}"));
            std::fs::write(&f, noise(d * 1000 + i, (i % 100) as usize)).unwrap();
            std::fs::set_permissions(
                &f,
                std::os::unix::fs::PermissionsExt::from_mode(0o600 + (i as u32 % 4) * 0o40),
            )
            .unwrap();
        }
    }
    let home = dir.path().join("source-home");
    let id = init(&home);
    let config = format!(
        "[target]\napply_threads = 4\n\n[[target.allow]]\nname = \"s1\"\nid = \"{id}\"\nhistory = \"off\"\n"
    );
    let data = dir.path().join("target-data");
    let target = start_target_config(dir.path(), &config, "127.0.0.1:0", &data, None);
    let replica = data.join("replicas/s1/job");
    let args = ["--name", "job", "--capture", "inotify"];
    let mut a = target.protect(&home, "agent", &src, &args);

    // Killed while its apply threads run (they live only while a run is applied).
    let pid = target.proc.child.id();
    wait_until(Duration::from_secs(120), "the target to apply new files on several threads", || {
        let lanes = threads_named(pid, "doppel-lane");
        (lanes > 0).then_some(()).ok_or(format!("acked {}", job_status(&home, "job")["last_acked_seq"]))
    });
    let port: u16 = target.addr.rsplit_once(':').unwrap().1.parse().unwrap();
    let mut old = target;
    old.proc.kill();
    let compares = |a: &Proc| a.log().matches("comparing the whole tree").count();
    let compared_before = compares(&a);
    let files_then = std::fs::read_dir(&replica).map_or(0, |d| d.count());
    let target = start_target_config(dir.path(), &config, &format!("127.0.0.1:{port}"), &data, None);
    wait_converged(&src, &replica, Duration::from_secs(300), &mut a);
    let log = target.proc.log();
    assert!(!log.contains("un-synced changes"), "a killed process is not an unclean shutdown:\n{log}");
    assert_eq!(compares(&a), compared_before, "a whole-tree comparison after the kill:\n{}", a.log());
    println!("the target was killed with {files_then} of 20 directories made");
}
