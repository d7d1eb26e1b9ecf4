//! `fuse` capture under breaks: the link cut and the agent killed at random points while
//! applications write. The replica must always be a state the source passed through (write
//! order across files is kept), databases on it must open cleanly, sync mode must keep every
//! committed transaction, and recovery after a kill compares only recently active regions.

mod common;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::sqlite::{Sqlite, check_replica_db};
use common::*;

/// Source, target, proxy in between, and the agent's arguments.
struct Rig {
    dir: tempfile::TempDir,
    src: PathBuf,
    home: PathBuf,
    target: TargetProc,
    proxy: Proxy,
    args: Vec<String>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        detach_stale_mount(&self.src);
    }
}

impl Rig {
    fn new(extra: &[&str]) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let src = std::fs::canonicalize(dir.path()).unwrap().join("src");
        std::fs::create_dir_all(&src).unwrap();
        let home = dir.path().join("source-home");
        let id = init(&home);
        let target = start_target(dir.path(), &[("s", &id)], 0);
        let proxy = Proxy::start(&target.addr);
        let mut args: Vec<String> = vec![
            "protect".into(),
            src.to_string_lossy().into(),
            "--to".into(),
            proxy.addr().into(),
            "--target-id".into(),
            target.id.clone(),
            "--name".into(),
            "job".into(),
            "--capture".into(),
            "fuse".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Rig { dir, src, home, target, proxy, args }
    }

    fn replica(&self) -> PathBuf {
        self.target.data.join("replicas/s/job")
    }

    fn start_agent(&self, n: usize) -> Proc {
        let argv: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let mut p = Proc::start(&self.home, &format!("agent{n}"), &argv);
        wait_until(Duration::from_secs(60), "the agent to replicate", || {
            if !p.running() {
                panic!("agent exited: {}", p.log());
            }
            let s = job_status(&self.home, "job");
            (s["connected"] == true && s["state"] == "replicating" && capture_mount_live(&self.src))
                .then_some(())
                .ok_or(s.to_string())
        });
        p
    }

    /// A random cut under `writer`'s load: lets it write a while, cuts the link, lets it write
    /// on into the spool, SIGKILLs `agent` and waits until the replica holds still.
    fn cut_and_kill(&self, writer: &RecordWriter, rng: &mut Rng, agent: &mut Proc) {
        let before = writer.written();
        wait_until(Duration::from_secs(30), "records to be written", || {
            (writer.written() > before + 50 + rng.below(400))
                .then_some(())
                .ok_or(writer.written().to_string())
        });
        self.proxy.cut();
        // Records keep going into the spool while the link is down.
        let during = writer.written();
        wait_until(Duration::from_secs(30), "records while the link is cut", || {
            (writer.written() > during + rng.below(100)).then_some(()).ok_or(writer.written().to_string())
        });
        agent.kill();
        self.target_quiet();
    }

    /// Waits until the target finished with the (cut) session, so the replica holds still.
    fn target_quiet(&self) {
        wait_until(Duration::from_secs(30), "the target to end the session", || {
            let r = replica_status(&self.target.proc.home);
            (r["connected"] == false).then_some(()).ok_or(r.to_string())
        });
    }
}

/// Appends numbered 32-byte records round-robin to `files` logs through the mount, syncing
/// now and then; after a failure (the mount died with the agent) it waits for a live mount,
/// reopens, and writes the same record again.
struct RecordWriter {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    /// Every `fdatasync` that returned success: (log, last record written before it).
    synced: Arc<parking_lot::Mutex<Vec<(u64, u64)>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

const RECORD: usize = 32;

impl RecordWriter {
    fn start(src: &Path, files: u64) -> RecordWriter {
        let (stop, written) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let synced = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (s, w, src, log) = (stop.clone(), written.clone(), src.to_path_buf(), synced.clone());
        let handle = std::thread::spawn(move || {
            let mut n = 0u64;
            let mut fds: Option<Vec<std::fs::File>> = None;
            while !s.load(Ordering::Relaxed) {
                if fds.is_none() {
                    if !capture_mount_live(&src) {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    let open = (0..files)
                        .map(|i| {
                            std::fs::OpenOptions::new()
                                .create(true)
                                .append(true)
                                .open(src.join(format!("log{i}")))
                        })
                        .collect::<Result<Vec<_>, _>>();
                    match open {
                        Ok(v) => fds = Some(v),
                        Err(_) => continue,
                    }
                }
                let f = &mut fds.as_mut().expect("opened")[(n % files) as usize];
                let mut rec = format!("R{n:012}").into_bytes();
                rec.resize(RECORD - 1, b'.');
                rec.push(b'\n');
                match f.write_all(&rec) {
                    Ok(()) => {
                        if n.is_multiple_of(37) && f.sync_data().is_ok() {
                            log.lock().push((n % files, n));
                        }
                        n += 1;
                        w.store(n, Ordering::Relaxed);
                    }
                    Err(_) => fds = None,
                }
                // Pacing of the load generator.
                std::thread::sleep(Duration::from_micros(500));
            }
        });
        RecordWriter { stop, written, synced, handle: Some(handle) }
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
    }
}

/// Record numbers found in the logs under `dir`, checking that every record is whole.
fn records(dir: &Path, files: u64) -> Vec<u64> {
    records_with(dir, files, false)
}

/// [`records`]; with `holes`, zero-filled records (pages of the file written back after a
/// later one, or lost with a killed agent) are skipped.
fn records_with(dir: &Path, files: u64, holes: bool) -> Vec<u64> {
    let mut out = Vec::new();
    for i in 0..files {
        let Ok(bytes) = std::fs::read(dir.join(format!("log{i}"))) else { continue };
        assert_eq!(bytes.len() % RECORD, 0, "log{i} holds a partial record ({} bytes)", bytes.len());
        for r in bytes.chunks(RECORD) {
            if holes && r.iter().all(|&b| b == 0) {
                continue;
            }
            let n: u64 = std::str::from_utf8(&r[1..13]).unwrap().parse().unwrap();
            assert_eq!(n % files, i, "record {n} in the wrong log");
            out.push(n);
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The replica holds records 0..=max with none missing.
fn assert_prefix(dir: &Path, files: u64, when: &str) -> u64 {
    let recs = records(dir, files);
    if let Some(&max) = recs.last() {
        let missing: Vec<u64> = (0..=max).filter(|n| recs.binary_search(n).is_err()).take(10).collect();
        assert!(missing.is_empty(), "{when}: the replica has record {max} but lacks {missing:?}");
        max + 1
    } else {
        0
    }
}

#[test]
fn write_order_survives_link_cuts_and_agent_kills() {
    if !fuse_available() {
        return;
    }
    let rig = Rig::new(&[]);
    let mut rng = Rng::from_time();
    let mut agent = rig.start_agent(0);
    let mut writer = RecordWriter::start(&rig.src, 4);
    let mut seen = Vec::new();
    for round in 1..=6 {
        rig.cut_and_kill(&writer, &mut rng, &mut agent);
        let n = assert_prefix(&rig.replica(), 4, &format!("cut {round}"));
        seen.push(n);
        rig.proxy.restore();
        agent = rig.start_agent(round);
    }
    writer.stop();
    let total = writer.written();
    wait_converged(&rig.src, &rig.replica(), Duration::from_secs(60), &mut agent);
    assert_eq!(assert_prefix(&rig.replica(), 4, "the end"), assert_prefix(&rig.src, 4, "the source"));
    println!("records on the replica at each cut: {seen:?}; {total} written");
    assert!(seen.windows(2).any(|w| w[1] > w[0]), "replication made no progress between cuts: {seen:?}");
    assert!(agent.log().contains("after an unclean stop"), "{}", agent.log());
    drop(rig);
}

/// With the kernel's write-back cache (`fuse_writeback = true`) writes reach the agent in
/// whatever order the kernel writes pages back, so the replica is no longer a prefix of the
/// records; what must hold at every cut is what a local disk guarantees: if the replica has
/// anything written after an `fdatasync` returned, it has everything that `fdatasync` covered
/// (every record of that log up to it, among those the source still has: a killed agent
/// loses what the kernel had not written back, on the source too).
#[test]
fn writeback_cache_keeps_every_fsync_boundary_at_link_cuts_and_agent_kills() {
    if !fuse_available() {
        return;
    }
    const FILES: u64 = 4;
    let (_conf, config) = writeback_config();
    let rig = Rig::new(&["--config", &config]);
    let mut rng = Rng::from_time();
    let mut agent = rig.start_agent(0);
    assert!(agent.log().contains("writeback=true"), "the write-back cache is on: {}", agent.log());
    let capture = job_status(&rig.home, "job")["capture"].as_str().unwrap_or_default().to_string();
    assert!(capture.contains("write-back cache"), "status names the mode: {capture:?}");
    let mut writer = RecordWriter::start(&rig.src, FILES);
    // At each cut: the records on the replica, and the fsyncs that had returned.
    let mut cuts = Vec::new();
    for round in 1..=6 {
        rig.cut_and_kill(&writer, &mut rng, &mut agent);
        let synced = writer.synced.lock().clone();
        let on_replica = records_with(&rig.replica(), FILES, true).len();
        cuts.push((round, records_with(&rig.replica(), FILES, true), synced));
        rig.proxy.restore();
        agent = rig.start_agent(round);
        // Written-back pages reach the agent only at an `fdatasync` or when the kernel writes
        // them back, so a round's records may all still be in the page cache at its cut: the
        // next cut waits until the restarted agent has carried some to the replica, or the
        // cuts could all find what the first one did and check nothing new.
        wait_until(Duration::from_secs(60), "the restarted agent to add records to the replica", || {
            let now = records_with(&rig.replica(), FILES, true).len();
            (now > on_replica).then_some(()).ok_or(format!("{now} records, {on_replica} at the cut"))
        });
    }
    writer.stop();
    let total = writer.written();
    wait_converged(&rig.src, &rig.replica(), Duration::from_secs(60), &mut agent);
    // What the source has (records lost with a killed agent's page cache are not there).
    let mut source: Vec<Vec<u64>> = vec![Vec::new(); FILES as usize];
    for r in records_with(&rig.src, FILES, true) {
        source[(r % FILES) as usize].push(r);
    }
    let mut seen = Vec::new();
    for (round, replica, synced) in &cuts {
        let Some(&max) = replica.last() else {
            seen.push(0);
            continue;
        };
        seen.push(replica.len());
        let mut checked = 0;
        for &(log, upto) in synced.iter().filter(|(_, upto)| *upto < max) {
            let missing: Vec<u64> = source[log as usize]
                .iter()
                .copied()
                .filter(|&r| r <= upto && replica.binary_search(&r).is_err())
                .take(10)
                .collect();
            assert!(
                missing.is_empty(),
                "cut {round}: the replica has record {max}, written after an fdatasync of log{log} at \
                 record {upto} returned, but lacks {missing:?} which that fdatasync covered"
            );
            checked += 1;
        }
        println!(
            "cut {round}: {} records on the replica, up to {max}; {checked} fsync boundaries hold",
            replica.len()
        );
    }
    println!("{total} records written; on the replica at each cut: {seen:?}");
    assert!(seen.windows(2).any(|w| w[1] > w[0]), "replication made no progress between cuts: {seen:?}");
    assert!(cuts.iter().any(|(_, _, s)| !s.is_empty()), "no fsync returned");
    drop(rig);
}

/// A config file whose section for the job "job" turns the write-back cache on (the command
/// line's directory and destination override the section's).
fn writeback_config() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("doppel.toml");
    std::fs::write(
        &path,
        "[[job]]\nname = \"job\"\npath = \"/nonexistent\"\nto = \"/nonexistent\"\ncapture = \"fuse\"\nfuse_writeback = true\n",
    )
    .unwrap();
    let path = path.to_string_lossy().into_owned();
    (dir, path)
}

fn sqlite_under_cuts(journal: &str) {
    sqlite_under_cuts_with(journal, &[]);
}

fn sqlite_under_cuts_with(journal: &str, extra: &[&str]) {
    if !fuse_available() {
        return;
    }
    if !common::sqlite::available() {
        return;
    }
    let mut args = vec!["--sync", "--sync-timeout", "2"];
    args.extend_from_slice(extra);
    let rig = Rig::new(&args);
    let mut rng = Rng::from_time();
    let db = rig.src.join("app.db");
    let mut agent = rig.start_agent(0);
    let mut sql = Sqlite::start(&db);
    assert!(sql.send(&format!(
        "PRAGMA journal_mode={journal}; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, pad BLOB); SELECT 'C', 0;\n"
    )));
    wait_until(Duration::from_secs(30), "the table", || {
        sql.confirmed.lock().first().copied().ok_or("none".to_string())
    });
    let mut next = 1;
    let scratch = rig.dir.path().join("check");
    for round in 1..=4 {
        let until = next + 20 + rng.below(60);
        while next < until {
            assert!(sql.transaction(next, Duration::from_secs(20)), "transaction {next} did not commit");
            next += 1;
        }
        rig.proxy.cut();
        let committed = sql.last();
        // The application keeps committing: sync mode degrades after its timeout.
        let more = rng.below(3);
        for _ in 0..more {
            if sql.transaction(next, Duration::from_secs(10)) {
                next += 1;
            }
        }
        agent.kill();
        drop(sql);
        rig.target_quiet();
        let (integrity, max) = check_replica_db(&rig.replica(), &scratch);
        assert_eq!(integrity.trim(), "ok", "cut {round}: the replica's database is damaged: {integrity}");
        assert!(
            max >= committed,
            "cut {round}: transaction {committed} was committed in sync mode but the replica has only {max}"
        );
        println!("cut {round}: replica consistent with {max} rows; {committed} committed before the cut");
        rig.proxy.restore();
        agent = rig.start_agent(round);
        sql = Sqlite::start(&db);
        let out =
            Command::new("sqlite3").arg(&db).arg("SELECT coalesce(max(id), 0) FROM t;").output().unwrap();
        next = String::from_utf8_lossy(&out.stdout).trim().parse::<u64>().unwrap() + 1;
    }
    drop(sql);
    wait_converged(&rig.src, &rig.replica(), Duration::from_secs(60), &mut agent);
    let (integrity, _) = check_replica_db(&rig.replica(), &scratch);
    assert_eq!(integrity.trim(), "ok");
}

#[test]
fn sqlite_rollback_journal_is_consistent_at_every_cut_and_sync_keeps_commits() {
    sqlite_under_cuts("delete");
}

#[test]
fn sqlite_wal_is_consistent_at_every_cut_and_sync_keeps_commits() {
    sqlite_under_cuts("wal");
}

/// SQLite orders its writes with fsync alone, so the write-back cache (which keeps exactly
/// the order at each fsync) must leave a database on the replica that opens cleanly at every
/// cut, with every transaction committed in sync mode.
#[test]
fn sqlite_with_the_writeback_cache_is_consistent_at_every_cut_and_sync_keeps_commits() {
    let (_conf, config) = writeback_config();
    sqlite_under_cuts_with("delete", &["--config", &config]);
    // The flag does what the config key does.
    sqlite_under_cuts_with("wal", &["--fuse-writeback"]);
}

/// A fuse job over a disk image of `size` bytes and the standard tree, replicating to a local
/// directory.
struct ImageJob {
    /// Declared first, so dropped first: a mount a failed test left goes before the directory.
    _mounts: StaleMountGuard,
    _dir: tempfile::TempDir,
    src: PathBuf,
    replica: PathBuf,
    home: PathBuf,
}

impl ImageJob {
    /// The job, and its first agent once the replica equals the tree.
    fn mirrored(size: u64) -> (ImageJob, Proc) {
        let dir = tempfile::tempdir().unwrap();
        let src = std::fs::canonicalize(dir.path()).unwrap().join("src");
        let (replica, home) = (dir.path().join("replica"), dir.path().join("home"));
        std::fs::create_dir_all(&src).unwrap();
        big_file(&src.join("disk.img"), size, 7);
        Tree::at(&src).standard();
        let job = ImageJob { _mounts: StaleMountGuard(src.clone()), _dir: dir, src, replica, home };
        let mut agent = Proc::start(&job.home, "agent1", &job.args());
        wait_converged(&job.src, &job.replica, Duration::from_secs(120), &mut agent);
        (job, agent)
    }

    fn args(&self) -> [&str; 6] {
        ["protect", self.src.to_str().unwrap(), "--to", self.replica.to_str().unwrap(), "--capture", "fuse"]
    }
}

#[test]
fn a_killed_agent_compares_only_its_dirty_extents() {
    if !fuse_available() {
        return;
    }
    const BIG: u64 = 512 << 20;
    const HOT: u64 = 48 << 20;
    let (job, mut agent) = ImageJob::mirrored(BIG);
    let (src, replica, home, args) = (job.src.clone(), job.replica.clone(), job.home.clone(), job.args());
    // Random 4 KiB writes into the first 48 MiB of a 512 MiB image.
    let stop = Arc::new(AtomicBool::new(false));
    let (s, img) = (stop.clone(), src.join("disk.img"));
    let writer = std::thread::spawn(move || {
        let mut rng = Rng::new(42);
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        let mut n = 0u64;
        while !s.load(Ordering::Relaxed) {
            let off = rng.below(HOT / 4096) * 4096;
            if f.write_all_at(&noise(n, 4096), off).is_err() {
                break;
            }
            n += 1;
        }
        n
    });
    wait_until(Duration::from_secs(30), "the write load to get going", || {
        let s = job_status(&home, "src");
        (s["dirty_regions"].as_u64() >= Some(8)).then_some(()).ok_or(s.to_string())
    });
    let hot = job_status(&home, "src")["dirty_regions"].as_u64().unwrap();
    agent.kill();
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    let mut agent = Proc::start(&home, "agent2", &args);
    wait_converged(&src, &replica, Duration::from_secs(120), &mut agent);
    let st = job_status(&home, "src");
    let (compared, sent) = (st["bytes_hashed"].as_u64().unwrap(), st["bytes_sent"].as_u64().unwrap());
    println!(
        "{writes} writes; {hot} dirty regions at the kill; after restart {compared} bytes compared, {sent} sent"
    );
    let log = agent.log();
    assert!(log.contains("after an unclean stop"), "{log}");
    let ranges: u64 = log
        .split("ranges=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the restarted agent lists the ranges it compares");
    assert!(ranges >= 1);
    // Every hot extent was compared in full (each lies within the 48 MiB image region).
    assert_eq!(compared, ranges * (4 << 20), "{ranges} ranges");
    // Bounded by the hot extents (4 MiB each, plus a margin for regions made hot between the
    // status read and the kill), not by the 512 MiB tree.
    assert!(compared <= (hot + 16) * (4 << 20), "compared {compared} bytes for {hot} dirty regions");
    assert!(compared < BIG / 4, "compared {compared} bytes: a whole-tree comparison?");
    // What was still unacknowledged in the (write-through) spool, plus the blocks that differ:
    // less than the hot region itself.
    assert!(sent < HOT, "sent {sent} bytes");
}

/// A cleanly stopped fuse job keeps an index of the tree as of the stop: started again, it
/// compares only the names changed while it was stopped, not the whole tree.
#[test]
fn a_cleanly_stopped_fuse_job_compares_only_what_changed_while_stopped() {
    if !fuse_available() {
        return;
    }
    let (job, mut agent) = ImageJob::mirrored(32 << 20);
    let (src, replica, home, args) = (job.src.clone(), job.replica.clone(), job.home.clone(), job.args());
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.log());
    // Changed while nothing captured them.
    std::fs::write(src.join("stopped.txt"), noise(1, 100_000)).unwrap();
    std::fs::write(src.join("dir1/b.bin"), noise(2, 50_000)).unwrap();
    let mut agent = Proc::start(&home, "agent2", &args);
    wait_converged(&src, &replica, Duration::from_secs(120), &mut agent);
    let st = job_status(&home, "src");
    let (compared, sent) = (st["bytes_hashed"].as_u64().unwrap(), st["bytes_sent"].as_u64().unwrap());
    assert!(
        compared < 1 << 20,
        "compared {compared} bytes after a clean stop: the whole tree?\n{}",
        agent.log()
    );
    assert!(sent < 1 << 20, "sent {sent} bytes");
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.log());
}

/// Names made while the spool is full are dropped from it; what brings them to the replica is
/// the activity log's record for their directory (one record for all of them, not one per
/// name), compared once the link is back.
#[test]
fn names_made_while_the_spool_overflows_reach_the_replica_through_their_directorys_record() {
    if !fuse_available() {
        return;
    }
    let rig = Rig::new(&["--spool-limit", "1MiB"]);
    std::fs::create_dir(rig.src.join("burst")).unwrap();
    std::fs::write(rig.src.join("burst/existing"), b"before the cut").unwrap();
    for i in 0..30 {
        std::fs::write(rig.src.join(format!("burst/old{i:02}")), b"replicated, then removed").unwrap();
    }
    std::fs::create_dir_all(rig.src.join("burst/olddir/inner")).unwrap();
    std::fs::write(rig.src.join("burst/olddir/inner/f"), b"x").unwrap();
    let mut agent = rig.start_agent(1);
    wait_converged(&rig.src, &rig.replica(), Duration::from_secs(60), &mut agent);
    rig.proxy.cut();
    let burst = rig.src.join("burst");
    let mut made = 0u64;
    let mut make = |dir: &Path, n: u64| {
        for _ in 0..n {
            std::fs::write(dir.join(format!("f{made:05}")), noise(made, 16 << 10)).unwrap();
            made += 1;
        }
    };
    wait_until(Duration::from_secs(60), "the spool to overflow", || {
        make(&burst, 8);
        let s = job_status(&rig.home, "job");
        (s["state"] == "overflow").then_some(()).ok_or(s.to_string())
    });
    // Dropped from here on: files, a directory with files, a symlink, a hard link, an older
    // file rewritten (not a name made: its own name's region brings it), and removals (found
    // by listing the replica's directory).
    make(&burst, 300);
    std::fs::write(burst.join("existing"), noise(9, 20 << 10)).unwrap();
    // Removals: files and a directory tree the replica has.
    for i in 0..30 {
        std::fs::remove_file(burst.join(format!("old{i:02}"))).unwrap();
    }
    std::fs::remove_dir_all(burst.join("olddir")).unwrap();
    std::fs::create_dir(burst.join("sub")).unwrap();
    make(&burst.join("sub"), 20);
    std::os::unix::fs::symlink("f00000", burst.join("link")).unwrap();
    std::fs::hard_link(burst.join("f00001"), burst.join("hard")).unwrap();
    let regions = job_status(&rig.home, "job")["dirty_regions"].as_u64().unwrap();
    assert!(regions < 40, "{regions} dirty regions for {made} files in two directories");
    rig.proxy.restore();
    wait_converged(&rig.src, &rig.replica(), Duration::from_secs(120), &mut agent);
    let log = agent.log();
    assert!(log.contains("after the overflow: to compare with the replica"), "{log}");
}
