//! A failover during a resync: the link is cut, the spool overflows, the link comes back and
//! the resync (comparing what changed) is cut short by a SIGKILL of the agent. The replica then
//! mixes old and new blocks; `doppel failover` without `--at` goes back to the `pre-resync`
//! point, where the SQLite database written through the fuse capture passes `integrity_check`
//! and holds every transaction committed before the link was cut.

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::sqlite::{Sqlite, check_replica_db};
use common::*;
use serde_json::Value;

fn history(th: &std::path::Path) -> Value {
    let (st, out, err) = run(th, &["history", "list", "s/job", "--json"]);
    assert!(st.success(), "{err}");
    serde_json::from_str(&out).unwrap()
}

/// Whether the newest named point is a `pre-resync` (a resync started and has not ended).
fn resyncing(h: &Value) -> bool {
    let kinds: Vec<&str> =
        h["points"].as_array().unwrap().iter().filter_map(|p| p["kind"].as_str()).collect();
    let pre = kinds.iter().rposition(|k| *k == "pre-resync");
    let done = kinds.iter().rposition(|k| *k == "resynced");
    matches!((pre, done), (Some(p), Some(d)) if p > d)
}

#[test]
fn a_failover_during_a_resync_starts_from_the_pre_resync_point_with_a_sound_database() {
    if !fuse_available() || !common::sqlite::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::canonicalize(dir.path()).unwrap().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..4 {
        big_file(&src.join(format!("data{i}.bin")), 8 << 20, 40 + i);
    }
    let home = dir.path().join("source-home");
    let id = init(&home);
    let target = start_target(dir.path(), &[("s", &id)], 0);
    let th = target.proc.home.clone();
    let proxy = Proxy::start(&target.addr);
    let argv = [
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
        "--spool-limit",
        "4MiB",
    ];
    // What the killed agent's mount leaves at `src` goes before the directory does.
    let _mount = StaleMountGuard(src.clone());
    let mut agent = Proc::start(&home, "agent", &argv);
    let replica = target.data.join("replicas/s/job");
    wait_converged(&src, &replica, Duration::from_secs(120), &mut agent);
    wait_until(Duration::from_secs(60), "the first mirror to end", || {
        let h = history(&th);
        (!resyncing(&h) && h["points"].to_string().contains("resynced")).then_some(()).ok_or(h.to_string())
    });

    // A database written through the capture mount.
    let db = src.join("app.db");
    let mut sql = Sqlite::start(&db);
    assert!(sql.send("PRAGMA journal_mode=delete; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, pad BLOB); SELECT 'C', 0;\n"));
    wait_until(Duration::from_secs(30), "the table", || {
        sql.confirmed.lock().first().copied().ok_or("none".to_string())
    });
    for i in 1..=100 {
        assert!(sql.transaction(i, Duration::from_secs(30)), "transaction {i}");
    }
    let before_cut = sql.last();
    wait_converged(&src, &replica, Duration::from_secs(120), &mut agent);

    // The link goes down; the database and the data files go on changing until the spool
    // overflows.
    proxy.cut();
    let mut i = before_cut;
    wait_until(Duration::from_secs(120), "the spool to overflow", || {
        i += 1;
        assert!(sql.transaction(i, Duration::from_secs(30)), "transaction {i}");
        let f = std::fs::OpenOptions::new().write(true).open(src.join(format!("data{}.bin", i % 4))).unwrap();
        f.write_all_at(&noise(i, 1 << 20), (i % 7) << 20).unwrap();
        let s = job_status(&home, "job");
        (s["state"] == "overflow").then_some(()).ok_or(s.to_string())
    });
    // A bookmark now would not mark a consistent point: refused, saying why.
    let (st, _, err) = run(&home, &["history", "bookmark", "job", "during-overflow"]);
    assert!(!st.success() && err.contains("overflow"), "{err}");
    for _ in 0..20 {
        i += 1;
        assert!(sql.transaction(i, Duration::from_secs(30)), "transaction {i}");
    }
    // Enough changed that the resync takes a while at the rate below.
    for k in 0..16u64 {
        let f = std::fs::OpenOptions::new().write(true).open(src.join(format!("data{}.bin", k % 4))).unwrap();
        f.write_all_at(&noise(500 + k, 1 << 20), (k / 4) << 20).unwrap();
    }
    // Slow, so the resync is still running when the agent dies.
    let (st, _, err) = run(&home, &["limit", "job", "2Mbit"]);
    assert!(st.success(), "{err}");
    proxy.restore();
    wait_until(Duration::from_secs(120), "the resync under way on the target", || {
        let h = history(&th);
        let pre = h["points"].as_array().unwrap().iter().rev().find(|p| p["kind"] == "pre-resync");
        let newest = h["window"]["newest"]["seq"].as_u64().unwrap_or(0);
        // Some of the resync's changes applied, not all.
        match pre {
            Some(p) if resyncing(&h) && newest > p["seq"].as_u64().unwrap() + 4 => Ok(()),
            _ => Err(h.to_string()),
        }
    });
    // The source dies mid-resync: nothing more reaches the target.
    proxy.cut();
    agent.kill();
    drop(sql);
    assert!(resyncing(&history(&th)), "the resync ended before the agent was killed");

    let (st, out, err) = run(&th, &["failover", "s"]);
    assert!(st.success(), "failover failed: {out}{err}");
    let (_, ev, _) = run(&th, &["events", "--json"]);
    assert!(ev.contains("the point before an unfinished resync"), "{ev}");
    let (integrity, max) = check_replica_db(&replica, &dir.path().join("check"));
    assert_eq!(integrity, "ok", "the database at the pre-resync point is damaged");
    assert!(
        max >= before_cut,
        "{max} transactions at the pre-resync point, {before_cut} committed before the cut"
    );
}
