//! Point-in-time history of a SQLite database under `fuse` capture, with the real binary:
//! while transactions commit one after another, the wall-clock time each `COMMIT` returned is
//! recorded; then random times between the first and the last commit are restored, one fresh
//! directory each, a few while transactions go on committing and the rest once the replica holds
//! still. SQLite must open every restored database cleanly, holding every transaction whose
//! commit had returned by then and at most the one in flight; restoring changes nothing in the
//! replica.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::sqlite::Sqlite;
use common::*;

/// A fresh seed, or `DOPPEL_TEST_SEED` to replay a printed one.
fn seed() -> u64 {
    let s = std::env::var("DOPPEL_TEST_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("DOPPEL_TEST_SEED={s} replays this run's points");
    s
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64
}

fn rfc3339(us: u64) -> String {
    jiff::Timestamp::from_microsecond(us as i64).unwrap().to_string()
}

/// `PRAGMA integrity_check` and the number of transactions in the database at `db`.
fn check_db(db: &Path) -> (String, u64) {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg("PRAGMA integrity_check; SELECT count(*) FROM t;")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let integrity = lines.next().unwrap_or_default().to_string();
    let count = lines.next().and_then(|l| l.parse().ok()).unwrap_or(u64::MAX);
    (format!("{integrity}{}", String::from_utf8_lossy(&out.stderr)), count)
}

/// Transactions at most; the commits stop earlier when they take longer than this.
const TRANSACTIONS: u64 = 500;
const COMMIT_BUDGET: Duration = Duration::from_secs(12);
const POINTS: usize = 20;
/// Points restored while transactions go on.
const DURING: usize = 5;

fn sqlite_points(journal: &str, sync: &str) {
    if !fuse_available() || !common::sqlite::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let (src, replica, home) = (base.join("src"), base.join("replica"), base.join("home"));
    std::fs::create_dir_all(&src).unwrap();
    let mut agent = Proc::start(
        &home,
        "agent",
        &["protect", src.to_str().unwrap(), "--to", replica.to_str().unwrap(), "--capture", "fuse"],
    );
    wait_until(Duration::from_secs(60), "the agent to replicate through its mount", || {
        if !agent.running() {
            panic!("agent exited: {}", agent.log());
        }
        let s = job_status(&home, "src");
        (s["state"] == "replicating" && capture_mount_live(&src)).then_some(()).ok_or(s.to_string())
    });

    let mut sql = Sqlite::start(&src.join("app.db"));
    assert!(sql.send(&format!(
        "PRAGMA journal_mode={journal}; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, pad BLOB); SELECT 'C', 0;\n"
    )));
    wait_until(Duration::from_secs(30), "the table", || {
        sql.confirmed.lock().first().copied().ok_or("none".into())
    });
    // commits[i - 1]: when transaction i's COMMIT was seen to return (a little after it did).
    let mut commits = Vec::new();
    let started = Instant::now();
    let mut next = 1;
    while next <= TRANSACTIONS && !(started.elapsed() > COMMIT_BUDGET && next > 100) {
        assert!(sql.transaction_at(next, sync, Duration::from_secs(20)), "transaction {next} did not commit");
        commits.push(now_us());
        next += 1;
    }
    println!("{} transactions in {:?}", commits.len(), started.elapsed());
    let seed = seed();
    let mut rng = Rng::new(seed);
    let (first, last) = (commits[0], *commits.last().unwrap());
    let points: Vec<u64> = (0..POINTS + DURING).map(|_| first + rng.below(last - first + 1)).collect();

    // A few points restored while transactions go on committing (and apply goes on). The
    // replica first catches up with the points: a time it has no op after yet restores its
    // newest point, which replication lag may hold back from the source.
    wait_db_replicated(&src, &replica);
    let during = {
        let (home, base, commits) = (home.clone(), base.clone(), commits.clone());
        let points = points[POINTS..].to_vec();
        std::thread::spawn(move || {
            points
                .iter()
                .enumerate()
                .map(|(n, &t)| check_point(&home, &base.join(format!("during-{n}")), t, &commits, seed))
                .collect::<Vec<_>>()
        })
    };
    let more = next;
    while !during.is_finished() || next < more + 20 {
        assert!(sql.transaction_at(next, sync, Duration::from_secs(20)), "transaction {next} did not commit");
        next += 1;
    }
    let during = during.join().unwrap();
    println!(
        "{DURING} restores during {} more transactions; (committed, held) at each: {during:?}",
        next - more
    );
    drop(sql);
    wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);

    // The others once the replica holds still: restoring changes nothing in it.
    let before = snapshot(&replica, Compare::default());
    let restores = Instant::now();
    let seen: Vec<_> = points[..POINTS]
        .iter()
        .enumerate()
        .map(|(n, &t)| check_point(&home, &base.join(format!("restored-{n}")), t, &commits, seed))
        .collect();
    println!("{POINTS} restores in {:?}; (committed, held) at each: {seen:?}", restores.elapsed());
    assert_eq!(before, snapshot(&replica, Compare::default()), "restoring changed the replica");
    assert!(agent.running(), "{}", agent.log());
    assert!(agent.stop().success(), "{}", agent.log());
}

/// Waits until the replica's database files hold what the source's do (while the database is
/// open: the `-shm` file it maps, and times, may differ until it is closed).
fn wait_db_replicated(src: &Path, replica: &Path) {
    let db = |root: &Path| -> Vec<(String, String, u64)> {
        snapshot(root, Compare::default())
            .into_iter()
            .filter(|(k, _)| ["app.db", "app.db-wal", "app.db-journal"].contains(&k.as_str()))
            .map(|(k, n)| (k, n.content, n.size))
            .collect()
    };
    wait_until(Duration::from_secs(60), "the replica's database to catch up", || {
        let (s, r) = (db(src), db(replica));
        (s == r).then_some(()).ok_or(format!("source {s:?}, replica {r:?}"))
    });
}

/// Restores job `src` of `home` at time `t` (µs) into `out` and checks the database there
/// against the commit times; returns (transactions committed by `t`, transactions held).
fn check_point(home: &Path, out: &Path, t: u64, commits: &[u64], seed: u64) -> (u64, u64) {
    let at = rfc3339(t);
    let (st, _, err) = run(home, &["history", "restore", "src", "--at", &at, "--to", out.to_str().unwrap()]);
    assert!(st.success(), "seed {seed}: restore at {at} failed: {err}");
    let (integrity, count) = check_db(&out.join("app.db"));
    let committed = commits.iter().filter(|&&c| c <= t).count() as u64;
    assert_eq!(
        integrity.trim(),
        "ok",
        "seed {seed}: the database restored at {at} ({committed} committed by then) is damaged"
    );
    assert!(
        count >= committed && count <= committed + 1,
        "seed {seed}: the database restored at {at} holds {count} transactions; {committed} had \
         committed by then (one more may be in flight)"
    );
    (committed, count)
}

#[test]
fn sqlite_rollback_journal_restored_at_random_times_holds_exactly_the_commits_made_by_then() {
    sqlite_points("delete", "EXTRA");
}

#[test]
fn sqlite_wal_restored_at_random_times_holds_exactly_the_commits_made_by_then() {
    sqlite_points("wal", "FULL");
}
