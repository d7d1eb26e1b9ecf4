//! History retention end to end, with the real binary: the window moves on by time (a whole
//! closed segment of the undo journal goes once its newest record is older than `--history`),
//! a size limit keeps the history on disk bounded while overwrites go on, `--history-min`
//! protects recent points from the size limit; and a target SIGKILLed in the middle of applying
//! a stream of overwrites keeps every point from before the kill, restorable exactly.
//!
//! Retention runs after a replica commit, at most once a second, so the tests keep small
//! changes coming while they wait for it.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use doppel_testkit::diff_snapshots;
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// The journal starts a new segment past this size (`SEGMENT_BYTES` in the apply crate).
const SEGMENT: u64 = 64 * MIB;

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64
}

fn rfc3339(us: u64) -> String {
    jiff::Timestamp::from_microsecond(us as i64).unwrap().to_string()
}

fn micros(rfc: &str) -> u64 {
    rfc.parse::<jiff::Timestamp>().unwrap().as_microsecond() as u64
}

/// `doppel history list REPLICA --json`.
fn list(home: &Path, replica: &str) -> Value {
    let (st, out, err) = run(home, &["history", "list", replica, "--json"]);
    assert!(st.success(), "history list failed: {err}");
    serde_json::from_str(&out).unwrap()
}

fn bytes(v: &Value) -> u64 {
    v["bytes"].as_u64().unwrap()
}

/// The time of the window's oldest point (0: no history).
fn oldest_time(v: &Value) -> u64 {
    v["window"]["oldest"]["time"].as_str().map_or(0, micros)
}

fn newest_seq(v: &Value) -> u64 {
    v["window"]["newest"]["seq"].as_u64().unwrap_or(0)
}

/// Overwrites `len` bytes of `path` in place (no truncation), in 1 MiB pieces.
fn overwrite(path: &Path, off: u64, len: u64, seed: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut at = 0;
    while at < len {
        let n = MIB.min(len - at);
        f.write_all_at(&noise(seed + at, n as usize), off + at).unwrap();
        at += n;
    }
}

fn restore(home: &Path, replica: &str, at: &str, to: &Path) -> (bool, String) {
    let (st, _, err) = run(home, &["history", "restore", replica, "--at", at, "--to", to.to_str().unwrap()]);
    (st.success(), err)
}

/// An embedded job protecting `dir/src` to `dir/replica` with `history` flags.
struct Embedded {
    dir: tempfile::TempDir,
    src: PathBuf,
    replica: PathBuf,
    home: PathBuf,
    agent: Proc,
    nudges: u64,
}

impl Embedded {
    fn start(files: &[(&str, u64)], history: &[&str]) -> Embedded {
        let dir = tempfile::tempdir().unwrap();
        let (src, replica, home) =
            (dir.path().join("src"), dir.path().join("replica"), dir.path().join("home"));
        std::fs::create_dir_all(&src).unwrap();
        for (i, (name, size)) in files.iter().enumerate() {
            big_file(&src.join(name), *size, 1000 * i as u64);
        }
        let mut args =
            vec!["protect", src.to_str().unwrap(), "--to", replica.to_str().unwrap(), "--capture", "inotify"];
        args.extend_from_slice(history);
        let mut agent = Proc::start(&home, "agent", &args);
        wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);
        Embedded { dir, src, replica, home, agent, nudges: 0 }
    }

    fn converge(&mut self) {
        wait_converged(&self.src, &self.replica, Duration::from_secs(60), &mut self.agent);
    }

    /// A small change, replicated (so the replica commits, and retention may run).
    fn nudge(&mut self) {
        self.nudges += 1;
        Tree::at(&self.src).file("nudge", self.nudges.to_string().as_bytes());
        self.converge();
    }

    fn list(&self) -> Value {
        list(&self.home, "src")
    }
}

/// Whole segments go by time: five 16 MiB overwrites make 80 MiB of history; segments close
/// every eighth of the window (and at 64 MiB), and once one's newest record is older than
/// `--history 3s`, the next retention drops it: the history shrinks, the window's oldest point
/// moves on, points before it are refused, points inside it still restore exactly.
#[test]
fn the_window_moves_on_by_time_a_closed_segment_at_a_time() {
    const FILE: u64 = 16 * MIB;
    let mut e = Embedded::start(&[("data.bin", FILE)], &["--history", "3s", "--history-min", "1s"]);
    let data = e.src.join("data.bin");
    for round in 0..5 {
        overwrite(&data, 0, FILE, 100 + round);
        e.converge();
    }
    let v1 = e.list();
    let (bytes1, oldest1) = (bytes(&v1), oldest_time(&v1));
    assert!(bytes1 > SEGMENT + 8 * MIB, "80 MiB overwritten: that much history expected: {v1}");

    let v2 = wait_until(Duration::from_secs(30), "the overwrites' segments to go by time", || {
        e.nudge();
        let v = e.list();
        (bytes(&v) + SEGMENT - 4 * MIB <= bytes1).then_some(v.clone()).ok_or(v.to_string())
    });
    let oldest2 = oldest_time(&v2);
    println!(
        "history {bytes1} bytes from {} -> {} bytes from {}",
        rfc3339(oldest1),
        bytes(&v2),
        rfc3339(oldest2)
    );
    assert!(oldest2 > oldest1, "the window's oldest point did not move on: {v1} -> {v2}");

    // A point inside the window restores exactly; one before it is refused, saying why.
    let manifest = snapshot(&e.replica, Compare::default());
    let t = now_us();
    let (ok, err) = restore(&e.home, "src", &rfc3339(t), &e.dir.path().join("at-t"));
    assert!(ok, "restore within the window failed: {err}");
    let d = diff_snapshots(&manifest, &snapshot(&e.dir.path().join("at-t"), Compare::default()));
    assert!(d.is_empty(), "the tree restored at {} is not the tree then:\n{d}", rfc3339(t));
    let gone = e.dir.path().join("gone");
    let (ok, err) = restore(&e.home, "src", &rfc3339(oldest1), &gone);
    assert!(!ok && err.contains("before the history held (points"), "{err}");
    assert!(!gone.exists());
    assert!(e.agent.stop().success(), "{}", e.agent.log());
}

/// `--history 3s`: a deleted file is held (in the attic) for the points before its delete; once
/// the delete is older than the window, while small changes go on, its space comes back.
#[test]
fn a_deleted_file_is_let_go_once_its_delete_is_older_than_the_window() {
    let mut e = Embedded::start(
        &[("gone.bin", 8 * MIB), ("kept.bin", MIB)],
        &["--history", "3s", "--history-min", "1s"],
    );
    std::fs::remove_file(e.src.join("gone.bin")).unwrap();
    e.converge();
    let deleted = Instant::now();
    let v = e.list();
    assert!(bytes(&v) >= 8 * MIB, "the deleted file is held for the points before its delete: {v}");
    let v = wait_until(Duration::from_secs(20), "the deleted file's space to come back", || {
        e.nudge();
        let v = e.list();
        (bytes(&v) < MIB).then_some(v.clone()).ok_or(format!("{:?} after the delete: {v}", deleted.elapsed()))
    });
    assert!(deleted.elapsed() > Duration::from_secs(3), "let go before the window passed: {v}");
    assert!(e.agent.stop().success(), "{}", e.agent.log());
}

/// `--history-size 1MiB` with no protected minimum: while 1 MiB overwrites go on (48 MiB of
/// old bytes in all) the history on disk stays far below what was overwritten, and once they
/// stop it is back within the limit.
#[test]
fn a_size_limit_keeps_the_history_bounded_while_overwrites_go_on() {
    const FILE: u64 = 4 * MIB;
    const ROUNDS: u64 = 48;
    let mut e = Embedded::start(
        &[("data.bin", FILE)],
        &["--history-size", "1MiB", "--history-min", "0s", "--history", "1h"],
    );
    let data = e.src.join("data.bin");
    let mut samples = Vec::new();
    for round in 0..ROUNDS {
        overwrite(&data, (round % 4) * MIB, MIB, 500 + round);
        e.converge();
        samples.push(bytes(&e.list()));
        // Pacing of the load generator.
        std::thread::sleep(Duration::from_millis(50));
    }
    let max = *samples.iter().max().unwrap();
    println!("history bytes after each of {ROUNDS} 1 MiB overwrites: {samples:?}");
    // Retention runs at most once a second: what a second of overwrites adds comes on top.
    assert!(max <= 16 * MIB, "the history grew to {max} bytes with a 1 MiB limit: {samples:?}");
    let settled = wait_until(Duration::from_secs(30), "the history to be within its limit", || {
        e.nudge();
        let b = bytes(&e.list());
        (b <= MIB).then_some(b).ok_or(b.to_string())
    });
    println!("after the overwrites: {settled} bytes");
    assert!(e.agent.stop().success(), "{}", e.agent.log());
}

/// `--history-size 1MiB --history-min 1h`: every point is within the protected minimum, so the
/// size limit drops nothing: 8 MiB of overwrites stay, and the first point restores exactly.
#[test]
fn history_min_protects_recent_points_from_the_size_limit() {
    const FILE: u64 = 2 * MIB;
    let mut e = Embedded::start(&[("data.bin", FILE)], &["--history-size", "1MiB", "--history-min", "1h"]);
    let data = e.src.join("data.bin");
    let manifest = snapshot(&e.replica, Compare::default());
    let t = now_us();
    for round in 0..4 {
        overwrite(&data, 0, FILE, 700 + round);
        e.converge();
    }
    // Retention runs at the first commit a second after the last one: commits for 2.5 s.
    let since = Instant::now();
    wait_until(Duration::from_secs(30), "retention to have run since the overwrites", || {
        e.nudge();
        (since.elapsed() > Duration::from_millis(2500)).then_some(()).ok_or(String::new())
    });
    let v = e.list();
    assert!(bytes(&v) >= 8 * MIB, "the size limit dropped protected points: {v}");
    assert!(oldest_time(&v) <= t, "{v}");
    let to = e.dir.path().join("first");
    let (ok, err) = restore(&e.home, "src", &rfc3339(t), &to);
    assert!(ok, "{err}");
    let d = diff_snapshots(&manifest, &snapshot(&to, Compare::default()));
    assert!(d.is_empty(), "the first point did not restore exactly:\n{d}");
    assert!(e.agent.stop().success(), "{}", e.agent.log());
}

/// `--history-size 50%` ("half of the replica's size"): 3 MiB of overwrites in a 16 MiB replica
/// are well within 8 MiB, so nothing may go.
#[test]
fn a_percentage_size_limit_keeps_a_history_smaller_than_that_share_of_the_replica() {
    const FILE: u64 = 16 * MIB;
    let mut e = Embedded::start(&[("data.bin", FILE)], &["--history-size", "50%", "--history-min", "0s"]);
    let data = e.src.join("data.bin");
    let manifest = snapshot(&e.replica, Compare::default());
    let t = now_us();
    for round in 0..3 {
        overwrite(&data, round * MIB, MIB, 900 + round);
        e.converge();
    }
    let since = Instant::now();
    wait_until(Duration::from_secs(30), "retention to have run since the overwrites", || {
        e.nudge();
        (since.elapsed() > Duration::from_millis(2500)).then_some(()).ok_or(String::new())
    });
    let v = e.list();
    assert!(bytes(&v) >= 3 * MIB, "a 50% limit of a 16 MiB replica dropped a 3 MiB history: {v}");
    let to = e.dir.path().join("first");
    let (ok, err) = restore(&e.home, "src", &rfc3339(t), &to);
    assert!(ok, "{err}");
    assert!(diff_snapshots(&manifest, &snapshot(&to, Compare::default())).is_empty());
    assert!(e.agent.stop().success(), "{}", e.agent.log());
}

/// Overwrites random `piece`-sized pieces of `files` in `src` until stopped.
struct Overwriter {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Overwriter {
    fn start(src: &Path, files: &[&str], size: u64, piece: u64, seed: u64) -> Overwriter {
        let (stop, writes) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (s, w) = (stop.clone(), writes.clone());
        let paths: Vec<PathBuf> = files.iter().map(|f| src.join(f)).collect();
        let handle = std::thread::spawn(move || {
            let mut rng = Rng::new(seed);
            while !s.load(Ordering::Relaxed) {
                let p = &paths[rng.below(paths.len() as u64) as usize];
                let off = rng.below(size / piece) * piece;
                overwrite(p, off, piece, rng.next());
                w.fetch_add(1, Ordering::Relaxed);
                // Pacing of the load generator.
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Overwriter { stop, writes, handle: Some(handle) }
    }

    fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
        self.writes()
    }
}

/// A remote target SIGKILLed while it applies a stream of overwrites, restarted on the same
/// data and home: once the replica has caught up, every point recorded before the kill
/// restores exactly the tree the replica held then, and `now` the tree it holds now.
#[test]
fn a_target_killed_mid_apply_keeps_every_point_from_before_the_kill() {
    const FILE: u64 = 4 * MIB;
    const FILES: [&str; 3] = ["a.bin", "b.bin", "c.bin"];
    let dir = tempfile::tempdir().unwrap();
    let (src, home) = (dir.path().join("src"), dir.path().join("source-home"));
    Tree::at(&src).standard();
    for (i, f) in FILES.iter().enumerate() {
        big_file(&src.join(f), FILE, 10 * i as u64);
    }
    let source_id = init(&home);
    let target = start_target(dir.path(), &[("web1", &source_id)], 0);
    let port: u16 = target.addr.rsplit_once(':').unwrap().1.parse().unwrap();
    let mut agent = target.protect(&home, "agent", &src, &["--name", "www", "--capture", "inotify"]);
    let replica = target.data.join("replicas/web1/www");
    let target_home = target.proc.home.clone();
    wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);

    // Points with the trees the replica held at them.
    let mut points = Vec::new();
    for (round, file) in FILES.iter().enumerate() {
        overwrite(&src.join(file), MIB, 2 * MIB, 40 + round as u64);
        Tree::at(&src).file(&format!("round{round}"), b"r");
        wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);
        points.push((rfc3339(now_us()), snapshot(&replica, Compare::default())));
    }

    // The kill, while the stream is being applied.
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut writer = Overwriter::start(&src, &FILES, FILE, MIB, seed);
    let applied = newest_seq(&list(&target_home, "web1/www"));
    wait_until(Duration::from_secs(30), "the target to apply some of the stream", || {
        let n = newest_seq(&list(&target_home, "web1/www"));
        (n > applied + 20).then_some(()).ok_or(format!("newest seq {n}"))
    });
    // With ops sent and not yet acknowledged: the target is applying (or committing) them.
    wait_until(Duration::from_secs(30), "ops in flight", || {
        let s = job_status(&home, "www");
        (s["last_acked_seq"].as_u64() < s["last_captured_seq"].as_u64()).then_some(()).ok_or(s.to_string())
    });
    let mut killed = target;
    killed.proc.kill();
    let at_kill = writer.writes();
    wait_until(Duration::from_secs(30), "overwrites while the target is down", || {
        (writer.writes() > at_kill + 20).then_some(()).ok_or(writer.writes().to_string())
    });
    let target = start_target(dir.path(), &[("web1", &init(&home))], port);
    wait_until(Duration::from_secs(60), "the agent to reconnect", || {
        let s = job_status(&home, "www");
        (s["connections"].as_u64() >= Some(2) && s["connected"] == true).then_some(()).ok_or(s.to_string())
    });
    let resumed = newest_seq(&list(&target_home, "web1/www"));
    wait_until(Duration::from_secs(30), "the restarted target to apply more of the stream", || {
        let n = newest_seq(&list(&target_home, "web1/www"));
        (n > resumed + 20).then_some(()).ok_or(format!("newest seq {n}"))
    });
    let writes = writer.stop();
    wait_converged(&src, &replica, Duration::from_secs(120), &mut agent);
    let resent = job_status(&home, "www")["bytes_resent"].as_u64().unwrap_or(0);
    let torn = target.proc.log().contains("cutting a torn tail");
    println!(
        "{writes} overwrites of 1 MiB; the target was killed after {at_kill}; {resent} bytes sent again; torn journal tail: {torn}"
    );

    for (n, (at, manifest)) in points.iter().enumerate() {
        let to = dir.path().join(format!("point{n}"));
        let (ok, err) = restore(&target_home, "web1/www", at, &to);
        assert!(ok, "restore at {at} failed: {err}");
        let d = diff_snapshots(manifest, &snapshot(&to, Compare::default()));
        assert!(d.is_empty(), "point {n} ({at}, before the kill) did not restore exactly:\n{d}");
    }
    let now = snapshot(&replica, Compare::default());
    let to = dir.path().join("now");
    let (ok, err) = restore(&target_home, "web1/www", "now", &to);
    assert!(ok, "{err}");
    let d = diff_snapshots(&now, &snapshot(&to, Compare::default()));
    assert!(d.is_empty(), "now did not restore the replica as it is:\n{d}");
    assert!(agent.stop().success(), "{}", agent.log());
    drop(target);
}
