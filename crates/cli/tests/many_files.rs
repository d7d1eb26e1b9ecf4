//! File servers with millions of files (issue 15), at a scale a CI run can afford: a tree of
//! 200,000 small files protected in the default `watch` capture mode to a target on 127.0.0.1.
//!
//! - **Bounded memory.** The agent's peak resident set (`VmHWM`) through the initial mirror and
//!   a round of changes (creates, deletes, content writes, renames of directories holding
//!   thousands of files) stays under a fixed bound, and is at most a modest margin above the
//!   peak of the same run on 20,000 files: what the agent keeps per file must live on disk,
//!   not in memory. The same holds for the agents restarted below.
//! - **Restarts without a full re-hash.** After a clean stop (SIGTERM) and after a SIGKILL in
//!   the middle of a stream of changes, with more changes made while no agent ran, the
//!   restarted agent hashes and sends only a small fraction of the tree, and the replica again
//!   equals the source.
//!
//! Both sizes run in one test, one after the other: run side by side on a 2-core machine they
//! would disturb each other's timings and memory, and the comparison needs both.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use doppel_testkit::{diff_snapshots, snapshot};

const MIB: u64 = 1 << 20;
/// The large tree.
const LARGE: usize = 200_000;
/// The small tree the large one's memory is compared with.
const SMALL: usize = 20_000;
/// Files per directory: 400 directories for the large tree, 40 for the small one.
const PER_DIR: usize = 500;
/// Top-level directories; each holds `files / PER_DIR / TOP` directories of files.
const TOP: usize = 20;

/// What the agent of the large tree may hold at its peak, whatever it does: the process's
/// fixed cost (runtime, TLS, buffers: 15-30 MiB in a debug build), the spool's memory queue
/// (pinned by [`SPOOL_LIMIT`]), the index cache (pinned by [`INDEX_CACHE`]), and room for the
/// allocator and the on-disk store's own bookkeeping. The agent that held its whole index in
/// memory (about 1.5 KiB per file) peaked at 300-330 MiB for this tree, and at 200-230 MiB
/// when restarted on it.
const PEAK_LIMIT: u64 = 128 * MIB;

/// How much more the large tree's agent may peak at than the small tree's. The trees differ by
/// 180,000 files: 40 MiB is about 230 bytes per extra file, a sixth of what the in-memory
/// index cost per file, so anything kept per file in memory (an index entry, a listing row, a
/// rename map) fails it, while what is bounded (the index cache, pinned small; buffers; the
/// allocator's slack) fits. What the spool held in memory beyond the small run is allowed for
/// on top: see [`Peak::allowed_above`].
const GROWTH_MARGIN: u64 = 40 * MIB;

/// The index cache the agent is given (`--index-cache`; this is also its default): pinned, so
/// the growth measured is what does not go through the cache.
const INDEX_CACHE: &str = "16MiB";

/// The spool's limit (`--spool-limit`, which also caps its memory queue): pinned, so that how
/// far the reading of the initial mirror runs ahead of the link (which varies with the load of
/// the machine) moves the peak by at most this much.
const SPOOL_LIMIT: &str = "16MiB";

/// How long the initial mirror of the large tree may take in a debug build on 2 cores.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(900);
/// How long the replica may take to equal the source after changes.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(300);

#[test]
fn two_hundred_thousand_small_files_bounded_memory_and_restarts_without_a_rehash() {
    let t = Instant::now();
    // The small tree's rig (target, agent, trees) goes before the large one starts.
    let small = memory_run(SMALL).peak.clone();
    println!("[{:6.1} s] small tree done", t.elapsed().as_secs_f64());
    let mut large = memory_run(LARGE);
    println!("[{:6.1} s] large tree mirrored and changed", t.elapsed().as_secs_f64());
    let clean = restart_after_clean_stop(&mut large);
    println!("[{:6.1} s] clean restart done", t.elapsed().as_secs_f64());
    let killed = restart_after_kill(&mut large);
    println!("[{:6.1} s] restart after SIGKILL done", t.elapsed().as_secs_f64());

    // The memory bounds are checked last, so one run also reports whether the restarts work.
    println!(
        "agent peak RSS (VmHWM): {SMALL} files {:.1} MiB, {LARGE} files {:.1} MiB (+{:.1} MiB, \
         {:.0} bytes per extra file); spool memory at most {:.1} and {:.1} MiB; the large tree's \
         agent restarted after a clean stop {:.1} MiB, after SIGKILL {:.1} MiB; limits {:.0} MiB, \
         +{:.0} MiB",
        mib(small.rss),
        mib(large.peak.rss),
        mib(large.peak.rss.saturating_sub(small.rss)),
        large.peak.rss.saturating_sub(small.rss) as f64 / (LARGE - SMALL) as f64,
        mib(small.spool),
        mib(large.peak.spool),
        mib(clean.rss),
        mib(killed.rss),
        mib(PEAK_LIMIT),
        mib(GROWTH_MARGIN),
    );
    let peaks = [
        ("mirrored and changed", &large.peak),
        ("restarted after a clean stop", &clean),
        ("restarted after SIGKILL", &killed),
    ];
    for (what, peak) in peaks {
        assert!(
            peak.rss <= PEAK_LIMIT,
            "the agent of {LARGE} files, {what}: peak RSS {:.1} MiB > {:.0} MiB",
            mib(peak.rss),
            mib(PEAK_LIMIT)
        );
        let allowed = peak.allowed_above(&small);
        assert!(
            peak.rss <= small.rss + allowed,
            "the agent's memory grows with the number of files: {:.1} MiB for {LARGE} files ({what}) \
             against {:.1} MiB for {SMALL} (allowed: +{:.1} MiB)",
            mib(peak.rss),
            mib(small.rss),
            mib(allowed)
        );
    }
}

/// One tree protected to one target.
struct Rig {
    /// Kept until the end: the target, the homes and the trees live in it.
    _dir: tempfile::TempDir,
    src: PathBuf,
    home: PathBuf,
    replica: PathBuf,
    target: TargetProc,
    /// The running agent, if any.
    agent: Option<Proc>,
    files: usize,
    bytes: u64,
    /// The agent's peak memory through the initial mirror and the first changes.
    peak: Peak,
}

/// An agent's peak memory.
#[derive(Debug, Clone, Default)]
struct Peak {
    /// `VmHWM`: the largest resident set the process had.
    rss: u64,
    /// The most the spool held in memory (pending ops not spilled to disk), as `doppel status`
    /// reported it while the test polled.
    spool: u64,
}

impl Peak {
    /// How far above `small` this peak may be: [`GROWTH_MARGIN`], plus what the spool held in
    /// memory beyond what it held in the small run. The spool queues mirror ops in memory up to
    /// its own limit ([`SPOOL_LIMIT`]) whatever the tree, so a larger tree may fill more of it
    /// when the link is slower than the reading; that is bounded, and not what this test is
    /// about.
    fn allowed_above(&self, small: &Peak) -> u64 {
        GROWTH_MARGIN + self.spool.saturating_sub(small.spool)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill();
        }
        self.target.proc.kill();
        remove_in_parallel(&[&self.src, &self.replica]);
    }
}

/// Removes what is under `roots` from a few threads at once: unlinking the 400,000 files of
/// the large tree and its replica one by one takes most of a minute.
fn remove_in_parallel(roots: &[&Path]) {
    let entries: Vec<PathBuf> = roots
        .iter()
        .flat_map(|r| fs::read_dir(r).into_iter().flatten().flatten().map(|e| e.path()))
        .collect();
    let per_thread = entries.len().div_ceil(4).max(1);
    std::thread::scope(|s| {
        for chunk in entries.chunks(per_thread) {
            s.spawn(move || {
                for p in chunk {
                    let _ = if p.is_dir() { fs::remove_dir_all(p) } else { fs::remove_file(p) };
                }
            });
        }
    });
}

/// Builds a tree of `files`, mirrors it, changes it, waits until the replica equals it, and
/// records the agent's peak memory. The agent keeps running.
fn memory_run(files: usize) -> Rig {
    let t = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let bytes = build_tree(&src, files);
    println!(
        "{files} files, {bytes} bytes, {} directories built in {:.1} s",
        dirs(files),
        t.elapsed().as_secs_f64()
    );
    let home = dir.path().join("source-home");
    let id = init(&home);
    let target = start_target(dir.path(), &[("s1", &id)], 0);
    let replica = target.data.join("replicas/s1/job");
    let mut r =
        Rig { _dir: dir, src, home, replica, target, agent: None, files, bytes, peak: Peak::default() };
    let t = Instant::now();
    r.agent = Some(start_agent(&r, "agent"));
    let spool = wait_drained(&mut r, MIRROR_TIMEOUT, "the initial mirror");
    println!(
        "{files} files: initial mirror acknowledged in {:.1} s, agent peak RSS so far {:.1} MiB",
        t.elapsed().as_secs_f64(),
        mib(peak_rss(agent(&r)))
    );
    let t = Instant::now();
    churn(&r.src, files);
    let spool = spool.max(wait_equal(&mut r, CONVERGE_TIMEOUT));
    println!("{files} files: changes replicated and compared in {:.1} s", t.elapsed().as_secs_f64());
    r.peak = Peak { rss: peak_rss(agent(&r)), spool };
    println!(
        "{files} files: agent peak RSS {:.1} MiB, spool memory at most {:.1} MiB",
        mib(r.peak.rss),
        mib(spool)
    );
    r
}

/// SIGTERM, changes while stopped, restart: the agent compares the tree with its index locally
/// and hashes only what changed. Returns the restarted agent's peak memory.
fn restart_after_clean_stop(r: &mut Rig) -> Peak {
    let mut a = r.agent.take().expect("running");
    assert!(a.stop().success(), "the agent did not stop cleanly:\n{}", tail(&a.log()));
    let changed = change_while_down(&r.src, r.files, 1);
    let t = Instant::now();
    r.agent = Some(start_agent(r, "agent-clean-restart"));
    let spool = wait_equal(r, CONVERGE_TIMEOUT);
    println!(
        "clean restart: equal again in {:.1} s ({changed} names changed while stopped)",
        t.elapsed().as_secs_f64()
    );
    let log = agent(r).log();
    assert!(log.contains("clean restart"), "not resumed as a clean restart:\n{}", tail(&log));
    Peak { rss: check_no_rehash(r, "after a clean stop", changed), spool }
}

/// Changes in flight, SIGKILL, more changes while down, restart: the agent compares only the
/// names changed since its last index checkpoint with the replica. Returns the restarted
/// agent's peak memory.
fn restart_after_kill(r: &mut Rig) -> Peak {
    let before = job_status(&r.home, "job")["last_captured_seq"].as_u64().unwrap_or(0);
    let mut changed = change_while_down(&r.src, r.files, 2);
    // Kill once the agent has captured some of them: ops in flight, some maybe not sequenced.
    wait_until(Duration::from_secs(60), "the changes to be captured", || {
        let s = job_status(&r.home, "job");
        let c = s["last_captured_seq"].as_u64().unwrap_or(0);
        (c > before).then_some(()).ok_or(s.to_string())
    });
    let mut a = r.agent.take().expect("running");
    a.kill();
    changed += change_while_down(&r.src, r.files, 3);
    let t = Instant::now();
    r.agent = Some(start_agent(r, "agent-after-kill"));
    let spool = wait_equal(r, CONVERGE_TIMEOUT);
    println!("after SIGKILL: equal again in {:.1} s ({changed} names changed)", t.elapsed().as_secs_f64());
    let log = agent(r).log();
    assert!(log.contains("after an unclean stop"), "not resumed as after an unclean stop:\n{}", tail(&log));
    Peak { rss: check_no_rehash(r, "after SIGKILL", changed), spool }
}

/// The running agent neither compared the whole tree nor hashed or sent more than a small
/// fraction of it; returns its peak RSS.
fn check_no_rehash(r: &Rig, what: &str, changed: usize) -> u64 {
    let a = agent(r);
    let s = job_status(&r.home, "job");
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    let (files_hashed, bytes_hashed, sent) = (n("files_hashed"), n("bytes_hashed"), n("bytes_sent"));
    let io = proc_io(a);
    let rss = peak_rss(a);
    println!(
        "{what}: {files_hashed} files / {bytes_hashed} bytes hashed, {sent} bytes sent, rchar {} \
         read_bytes {}, peak RSS {:.1} MiB, index {} bytes (tree: {} files, {} bytes; {changed} changed)",
        io.0,
        io.1,
        mib(rss),
        dir_bytes(&r.home.join("jobs/job")),
        r.files,
        r.bytes
    );
    let log = a.log();
    assert!(!log.contains("comparing the whole tree"), "{what}: a whole-tree comparison:\n{}", tail(&log));
    // A full re-hash reads every file; the changes touched under 1 % of them.
    let files = r.files as u64;
    assert!(files_hashed < files / 20, "{what}: {files_hashed} of {files} files hashed: a full re-hash?");
    assert!(
        bytes_hashed < r.bytes / 20,
        "{what}: {bytes_hashed} of {} bytes hashed: a full re-hash?",
        r.bytes
    );
    // A re-mirror sends at least a name and the metadata of every file: over 60 bytes each.
    assert!(sent < files * 60 / 10, "{what}: {sent} bytes sent: more than a tenth of a re-mirror");
    rss
}

fn start_agent(r: &Rig, log: &str) -> Proc {
    let args = ["--name", "job", "--spool-limit", SPOOL_LIMIT, "--index-cache", INDEX_CACHE];
    r.target.protect(&r.home, log, &r.src, &args)
}

fn agent(r: &Rig) -> &Proc {
    r.agent.as_ref().expect("an agent runs")
}

/// Waits until the job replicates, connected, with everything captured acknowledged; returns
/// the most the spool held in memory meanwhile.
fn wait_drained(r: &mut Rig, timeout: Duration, what: &str) -> u64 {
    let mut spool = 0;
    let (home, a) = (&r.home, r.agent.as_mut().expect("running"));
    wait_until(timeout, what, || {
        assert!(a.running(), "the agent exited:\n{}", tail(&a.log()));
        let s = job_status(home, "job");
        let n = |k: &str| s[k].as_u64().unwrap_or(0);
        spool = spool.max(n("pending_bytes").saturating_sub(n("spooled_bytes")));
        let drained = s["state"] == "replicating"
            && s["connected"] == true
            && n("last_captured_seq") > 0
            && n("last_acked_seq") == n("last_captured_seq");
        drained.then_some(()).ok_or_else(|| s.to_string())
    });
    spool
}

/// Waits until the agent has acknowledged everything and the replica equals the source (bytes,
/// modes, owners, times); returns the most the spool held in memory meanwhile.
fn wait_equal(r: &mut Rig, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    let mut spool = 0;
    loop {
        spool = spool.max(wait_drained(
            r,
            deadline.saturating_duration_since(Instant::now()),
            "the changes to be acknowledged",
        ));
        let t = Instant::now();
        let result = equal(&r.src, &r.replica);
        println!(
            "  compared the trees in {:.1} s: {}",
            t.elapsed().as_secs_f64(),
            if result.is_ok() { "equal" } else { "not yet" }
        );
        match result {
            Ok(()) => return spool,
            Err(e) if Instant::now() >= deadline => panic!("the replica does not equal the source: {e}"),
            // Changes not captured yet (the debounce) when the spool looked drained.
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The testkit's comparison (names, types, modes, owners, times, contents, xattrs), with both
/// trees described at once: on 200,000 files each description takes seconds.
fn equal(src: &Path, replica: &Path) -> Result<(), String> {
    let opts = Compare::default();
    let (want, got) = std::thread::scope(|s| {
        let want = s.spawn(|| snapshot(src, opts));
        let got = snapshot(replica, opts);
        (want.join().expect("snapshot of the source"), got)
    });
    let diff = diff_snapshots(&want, &got);
    if diff.is_empty() {
        return Ok(());
    }
    let lines: Vec<&str> = diff.lines().collect();
    Err(format!("{} differences, the first: \n{}", lines.len(), lines[..lines.len().min(20)].join("\n")))
}

// --- the tree -------------------------------------------------------------------------------

fn dirs(files: usize) -> usize {
    files.div_ceil(PER_DIR)
}

/// Directory `k`: `dTT/sSSS`, spread over [`TOP`] top-level directories.
fn dir_name(k: usize) -> String {
    format!("d{:02}/s{:03}", k % TOP, k / TOP)
}

/// File `i`, where the tree was built (it may have moved since).
fn file_name(i: usize) -> String {
    format!("{}/f{i:06}", dir_name(i / PER_DIR))
}

/// File `i`'s size: 0-99 bytes.
fn size_of(i: usize) -> usize {
    (i * 37 + 11) % 100
}

/// Writes `files` files of 0-99 bytes of noise, [`PER_DIR`] to a directory, from a few threads
/// (creating files is mostly the kernel's work, which then runs on every core); returns the
/// bytes written.
fn build_tree(src: &Path, files: usize) -> u64 {
    let n_dirs = dirs(files);
    for k in 0..n_dirs {
        fs::create_dir_all(src.join(dir_name(k))).unwrap();
    }
    const THREADS: usize = 4;
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                s.spawn(move || {
                    let mut bytes = 0u64;
                    for k in (t..n_dirs).step_by(THREADS) {
                        for i in k * PER_DIR..((k + 1) * PER_DIR).min(files) {
                            fs::write(src.join(file_name(i)), noise(i as u64, size_of(i))).unwrap();
                            bytes += size_of(i) as u64;
                        }
                    }
                    bytes
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("a tree writer")).sum()
    })
}

/// About 1 % of the tree changes while the agent runs: content rewritten (same size, shorter,
/// longer) in 1 % of the files, modes changed, files deleted, a directory of 500 files deleted,
/// a top-level directory holding 5 % of the files and a directory of 500 files renamed, a new
/// directory of 1 % of the files and new files among the old ones.
fn churn(src: &Path, files: usize) {
    for i in (0..files).step_by(100) {
        let len = [size_of(i), size_of(i) / 2, size_of(i) + 40][i / 100 % 3];
        fs::write(src.join(file_name(i)), noise(1_000_000 + i as u64, len)).unwrap();
    }
    for i in (25..files).step_by(1000) {
        fs::set_permissions(src.join(file_name(i)), fs::Permissions::from_mode(0o600)).unwrap();
    }
    for i in (75..files).step_by(1000) {
        fs::write(src.join(format!("{}-sibling", file_name(i))), noise(3_000_000 + i as u64, 10)).unwrap();
    }
    for i in (50..files).step_by(200) {
        fs::remove_file(src.join(file_name(i))).unwrap();
    }
    fs::remove_dir_all(src.join(dir_name(1))).unwrap();
    fs::create_dir(src.join("renamed")).unwrap();
    fs::rename(src.join("d02"), src.join("renamed/d02")).unwrap();
    fs::rename(src.join(dir_name(3)), src.join("d04/moved-from-d03")).unwrap();
    let new = src.join("new/batch");
    fs::create_dir_all(&new).unwrap();
    for j in 0..files / 100 {
        fs::write(new.join(format!("n{j:06}")), noise(2_000_000 + j as u64, size_of(j))).unwrap();
    }
}

/// A smaller round of changes (round `round` picks other files): content rewritten in 0.1 %
/// of the files, as many deleted, 100 new files in a new directory, a directory of 500 files
/// renamed. Files the first round moved or deleted are skipped. Returns the names changed.
fn change_while_down(src: &Path, files: usize, round: usize) -> usize {
    let mut changed = 0;
    for i in (round..files).step_by(1000) {
        let p = src.join(file_name(i));
        if p.exists() {
            fs::write(&p, noise(4_000_000 * round as u64 + i as u64, size_of(i + round))).unwrap();
            changed += 1;
        }
    }
    for i in (round + 500..files).step_by(1000) {
        let p = src.join(file_name(i));
        if p.exists() {
            fs::remove_file(&p).unwrap();
            changed += 1;
        }
    }
    let new = src.join(format!("made-while-down-{round}"));
    fs::create_dir(&new).unwrap();
    for j in 0..100 {
        fs::write(new.join(format!("m{j:03}")), noise(5_000_000 * round as u64 + j, j as usize)).unwrap();
    }
    // Directory TOP + 4 + round is `d0(4 + round)/s001`: the first round moved or deleted
    // nothing under d05-d07.
    let moved = dir_name(TOP + 4 + round);
    let to = format!("{moved}-renamed-{round}");
    fs::rename(src.join(&moved), src.join(&to)).unwrap();
    changed + 100 + PER_DIR
}

// --- measurements ---------------------------------------------------------------------------

/// The process's peak resident set (`VmHWM`), in bytes.
fn peak_rss(p: &Proc) -> u64 {
    proc_field(p, "status", "VmHWM:") * 1024
}

/// (`rchar`, `read_bytes`) of the process: bytes it read through system calls, and from disk.
fn proc_io(p: &Proc) -> (u64, u64) {
    (proc_field(p, "io", "rchar:"), proc_field(p, "io", "read_bytes:"))
}

/// The number after `key` in `/proc/PID/FILE`.
fn proc_field(p: &Proc, file: &str, key: &str) -> u64 {
    let path = format!("/proc/{}/{file}", p.child.id());
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {path}"))
}

/// Bytes of the regular files under `dir` (the job's state: index, spool, state file).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

/// The end of a log, for assertion messages.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
