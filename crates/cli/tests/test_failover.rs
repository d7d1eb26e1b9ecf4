//! Test failover end to end: a writable view of a replica at a point, started without copying
//! file data, while the source keeps writing and the replica keeps converging; writes in the
//! view never reach the replica; `--end` leaves no trace; a killed target ends its test when
//! it starts again.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use doppel_testkit::diff_snapshots;
use serde_json::Value;

/// Allocated bytes beneath `dir` on its own file system (mounted views are not data written).
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).map(|m| m.dev()).unwrap_or(0);
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.dev() != dev => 0,
            Ok(m) if m.is_dir() => m.blocks() * 512 + allocated(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

fn mounts_beneath(dir: &Path) -> Vec<String> {
    doppel_testkit::mount_points()
        .unwrap()
        .into_iter()
        .filter(|p| p.starts_with(dir))
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}

fn start_test(th: &Path, args: &[&str]) -> Value {
    let mut argv = vec!["test-failover", "s", "--json"];
    argv.extend_from_slice(args);
    let (st, out, err) = run(th, &argv);
    assert!(st.success(), "test-failover failed: {err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn a_test_failover_shows_its_point_writably_while_replication_goes_on_and_leaves_no_trace() {
    if !require_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    Tree::at(&src).standard();
    big_file(&src.join("disk.img"), 64 << 20, 7);
    let home = dir.path().join("source-home");
    let sid = init(&home);
    let marks = dir.path().join("marks");
    let config = format!(
        "[[target.allow]]\nname = \"s\"\nid = \"{sid}\"\n\
         test_failover = [\"echo start $DOPPEL_JOB $DOPPEL_TEST $DOPPEL_POINT $DOPPEL_REPLICA >> {m}\"]\n\
         test_failover_end = [\"echo end $DOPPEL_JOB >> {m}\"]\n",
        m = marks.display()
    );
    let data = dir.path().join("data");
    let mut target = start_target_config(dir.path(), &config, "127.0.0.1:0", &data, None);
    let th = target.proc.home.clone();
    let mut agent = target.protect(&home, "agent", &src, &["--name", "job", "--capture", "inotify"]);
    let replica = target.data.join("replicas/s/job");
    wait_converged(&src, &replica, Duration::from_secs(120), &mut agent);
    let at_point = snapshot(&src, Compare::default());

    // Start: a view per job, its point, the script run against it; no file data copied.
    let before = allocated(&data);
    let t = start_test(&th, &[]);
    let job = &t["jobs"][0];
    let view = PathBuf::from(job["view"].as_str().unwrap());
    let seq = job["point"]["seq"].as_u64().unwrap();
    assert!(job["point"]["time"].as_str().unwrap().contains('T') && job["point"]["kind"].is_string(), "{t}");
    let grew = allocated(&data).saturating_sub(before);
    assert!(grew < 1 << 20, "starting the test wrote {grew} bytes for a 64 MiB replica");
    let marked = std::fs::read_to_string(&marks).unwrap();
    assert_eq!(marked.trim(), format!("start job 1 seq:{seq} {}", view.display()));
    let d = diff_snapshots(&at_point, &snapshot(&view, Compare::default()));
    assert!(d.is_empty(), "the view is not the replica at its point:\n{d}");
    let (_, text, _) = run(&th, &["status"]);
    assert!(text.contains(&format!("TEST FAILOVER: job at seq:{seq}")), "{text}");
    // A second test while one runs: refused.
    let (st, _, err) = run(&th, &["test-failover", "s"]);
    assert!(!st.success() && err.contains("is running"), "{err}");

    // The source goes on; the replica converges; the view stays at its point.
    std::fs::write(src.join("a.txt"), b"changed after the point").unwrap();
    std::fs::remove_file(src.join("dir2/e")).unwrap();
    std::fs::rename(src.join("dir1"), src.join("dir1-renamed")).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(src.join("disk.img")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &noise(8, 1 << 20), 5 << 20).unwrap();
    drop(f);
    wait_converged(&src, &replica, Duration::from_secs(120), &mut agent);
    // The kernel may have cached what it read: drop caches so the view is read again.
    std::fs::write("/proc/sys/vm/drop_caches", b"3").unwrap();
    let d = diff_snapshots(&at_point, &snapshot(&view, Compare::default()));
    assert!(d.is_empty(), "the view moved off its point:\n{d}");

    // Writes in the view stay there.
    std::fs::write(view.join("written-in-test"), b"test data").unwrap();
    std::fs::write(view.join("dir1/b.bin"), b"overwritten in the test").unwrap();
    std::fs::write(src.join("after-test-writes"), b"x").unwrap();
    wait_converged(&src, &replica, Duration::from_secs(120), &mut agent);
    assert!(!replica.join("written-in-test").exists());

    // End: the end script runs, the views and what was written in them go.
    let (st, out, err) = run(&th, &["test-failover", "s", "--end"]);
    assert!(st.success() && out.contains("ended"), "{out}{err}");
    assert!(std::fs::read_to_string(&marks).unwrap().contains("end job"));
    assert!(mounts_beneath(&data).is_empty(), "{:?}", mounts_beneath(&data));
    assert!(!data.join("tests/s").exists());
    let (st, out, _) = run(&th, &["test-failover", "s", "--end"]);
    assert!(st.success() && out.contains("no test failover of s is running"), "{out}");
    wait_converged(&src, &replica, Duration::from_secs(120), &mut agent);
    let (_, ev, _) = run(&th, &["events", "--json"]);
    assert!(
        ev.contains(&format!("tested at job at seq:{seq}")) && ev.contains("test-failover-ended"),
        "{ev}"
    );

    // A point before the window: refused, nothing mounted.
    let (st, _, err) = run(&th, &["test-failover", "s", "--at", "2001-01-01T00:00:00Z"]);
    assert!(!st.success() && err.contains("before the history held"), "{err}");
    assert!(mounts_beneath(&data).is_empty());

    // A target killed during a test ends it when it starts again (its end script runs then).
    start_test(&th, &[]);
    target.proc.kill();
    target = start_target_config(dir.path(), &config, "127.0.0.1:0", &data, None);
    wait_until(Duration::from_secs(30), "the restarted target to end the test", || {
        let (_, ev, _) = run(&target.proc.home, &["events", "--json"]);
        ev.contains("the target was restarted").then_some(()).ok_or(ev)
    });
    assert!(mounts_beneath(&data).is_empty(), "{:?}", mounts_beneath(&data));
    assert!(!data.join("tests/s").exists());
    assert_eq!(std::fs::read_to_string(&marks).unwrap().matches("end job").count(), 2);
}
