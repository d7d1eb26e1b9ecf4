//! Failing over to a chosen point: a bookmark put into the op stream on the source, changes
//! after it replicated, then `doppel failover --at BOOKMARK` takes the replica back to it; an
//! interrupted failover refuses another point; bookmarks refuse bad names and duplicates.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use doppel_testkit::diff_snapshots;

fn events_text(target_home: &Path) -> String {
    let (st, out, err) = run(target_home, &["events", "--json"]);
    assert!(st.success(), "{err}");
    out
}

#[test]
fn failover_to_a_bookmark_rolls_the_replica_back_and_a_rerun_with_another_point_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    Tree::at(&src).standard().file("db/data", &noise(5, 200_000));
    let home = dir.path().join("source-home");
    let sid = init(&home);
    // The failover script fails until the operator creates `go`: the run stops after fencing.
    let go = dir.path().join("go");
    let config = format!(
        "[[target.allow]]\nname = \"s\"\nid = \"{sid}\"\nfailover = [\"test -e {}\"]\n",
        go.display()
    );
    let target = start_target_config(dir.path(), &config, "127.0.0.1:0", &dir.path().join("data"), None);
    let mut agent = target.protect(&home, "agent", &src, &["--name", "job", "--capture", "inotify"]);
    let replica = target.data.join("replicas/s/job");
    wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);
    let manifest = snapshot(&src, Compare::default());

    let (st, out, err) = run(&home, &["history", "bookmark", "job", "before-upgrade"]);
    assert!(st.success(), "bookmark failed: {err}");
    assert!(out.contains("bookmark before-upgrade at seq:"), "{out}");
    let (st, _, err) = run(&home, &["history", "bookmark", "job", "before-upgrade"]);
    assert!(!st.success() && err.contains("already has a bookmark \"before-upgrade\""), "{err}");
    let (st, _, err) = run(&home, &["history", "bookmark", "job", "9-lives"]);
    assert!(!st.success() && err.contains("not starting with '-' or a digit"), "{err}");
    // The bookmark reaches the target's history.
    let th = target.proc.home.clone();
    wait_until(Duration::from_secs(30), "the bookmark in the target's history", || {
        let (_, out, err) = run(&th, &["history", "list", "s/job", "--json"]);
        out.contains("\"before-upgrade\"").then_some(()).ok_or(format!("{out}{err}"))
    });

    // The "upgrade" goes wrong, and replicates.
    std::fs::write(src.join("db/data"), b"corrupted by the upgrade").unwrap();
    std::fs::remove_file(src.join("a.txt")).unwrap();
    std::fs::rename(src.join("dir2"), src.join("dir2-moved")).unwrap();
    wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);

    // Fail over to the bookmark: fenced and rolled back, then the script stops the run.
    let (st, out, err) = run(&th, &["failover", "s", "--at", "before-upgrade", "--job", "job"]);
    assert!(!st.success(), "the failover script should have failed: {out}{err}");
    let d = diff_snapshots(&manifest, &snapshot(&replica, Compare::default()));
    assert!(d.is_empty(), "the replica is not back at the bookmark:\n{d}");
    // Another point while that run is unfinished: refused, naming the point in use.
    let (st, _, err) = run(&th, &["failover", "s", "--at", "now"]);
    assert!(!st.success() && err.contains("to --at before-upgrade is under way"), "{err}");
    let d = diff_snapshots(&manifest, &snapshot(&replica, Compare::default()));
    assert!(d.is_empty(), "a refused rerun changed the replica:\n{d}");
    // The same point again, once the cause is fixed: it completes.
    std::fs::write(&go, b"").unwrap();
    let (st, out, err) = run(&th, &["failover", "s", "--at", "before-upgrade", "--job", "job"]);
    assert!(st.success(), "failover failed: {out}{err}");
    let d = diff_snapshots(&manifest, &snapshot(&replica, Compare::default()));
    assert!(d.is_empty(), "{d}");
    let ev = events_text(&th);
    assert!(ev.contains("rolled back to seq:") && ev.contains("--at before-upgrade"), "{ev}");
    // A stopped agent takes no bookmark.
    agent.kill();
    let (st, _, err) = run(&home, &["history", "bookmark", "job", "later"]);
    assert!(!st.success() && err.to_lowercase().contains("job"), "{err}");
}

#[test]
fn a_failover_during_the_first_mirror_is_refused_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..4 {
        big_file(&src.join(format!("big{i}.bin")), 16 << 20, 60 + i);
    }
    let home = dir.path().join("source-home");
    let sid = init(&home);
    let target = start_target(dir.path(), &[("s", &sid)], 0);
    let th = target.proc.home.clone();
    // Slow, so the first mirror is still running when the source dies.
    let mut agent =
        target.protect(&home, "agent", &src, &["--name", "job", "--capture", "inotify", "--limit", "4Mbit"]);
    wait_until(Duration::from_secs(60), "the first mirror under way on the target", || {
        let (_, out, err) = run(&th, &["history", "list", "s/job", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|_| format!("{out}{err}"))?;
        let newest = v["window"]["newest"]["seq"].as_u64().unwrap_or(0);
        (v["points"].to_string().contains("pre-resync")
            && !v["points"].to_string().contains("resynced")
            && newest > 4)
            .then_some(())
            .ok_or(v.to_string())
    });
    agent.kill();
    let (st, _, err) = run(&th, &["failover", "s"]);
    assert!(!st.success() && err.contains("no consistent point yet"), "{err}");
    assert_eq!(replica_status(&th)["failed_over"], false, "a refused failover fenced the replica");
    let (st, out, err) = run(&th, &["failover", "s", "--force"]);
    assert!(st.success(), "forced failover failed: {out}{err}");
}
