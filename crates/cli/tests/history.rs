//! Point-in-time history end to end, with the real binary: a ransomware-like change replicated
//! to an embedded and to a remote target, then the tree as it was restored by time, whole and
//! one file alone; the listing; bad input refused with nothing changed.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use doppel_testkit::diff_snapshots;

/// The standard tree plus more files, so "half are renamed" means something.
fn tree(src: &Path) {
    Tree::at(src).standard();
    for i in 0..12 {
        Tree::at(src).file(&format!("docs/f{i:02}.txt"), &noise(100 + i, 3000 + i as usize * 500));
    }
    Tree::at(src).xattr("docs/f03.txt", "user.owner", b"finance");
}

/// Every regular file overwritten in place, half of them renamed, a directory removed.
fn ransomware(src: &Path) {
    let files: Vec<String> = snapshot(src, Compare::default())
        .into_iter()
        .filter(|(_, n)| n.kind == "file" && n.size > 0)
        .map(|(k, _)| k)
        .collect();
    for (i, rel) in files.iter().enumerate() {
        let p = src.join(rel);
        let len = std::fs::metadata(&p).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&noise(9000 + i as u64, len as usize), 0).unwrap();
        drop(f);
        if i % 2 == 0 && std::fs::symlink_metadata(&p).is_ok() {
            let _ = std::fs::rename(&p, src.join(format!("{rel}.locked")));
        }
    }
    std::fs::remove_dir_all(src.join("dir1/sub/deeper")).unwrap();
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}

/// The checks both destinations share. `replica_name` is `JOB` or `SOURCE/JOB`; `home` runs
/// the history commands.
fn restore_checks(dir: &Path, src: &Path, replica: &Path, home: &Path, replica_name: &str, agent: &mut Proc) {
    wait_converged(src, replica, Duration::from_secs(120), agent);
    let manifest = snapshot(src, Compare::default());
    let t = now_rfc3339();
    ransomware(src);
    wait_converged(src, replica, Duration::from_secs(120), agent);
    assert!(
        !diff_snapshots(&manifest, &snapshot(replica, Compare::default())).is_empty(),
        "the ransomware replicated"
    );

    // The whole tree at T, while replication keeps running.
    let out = dir.join("restored");
    let (st, _, err) =
        run(home, &["history", "restore", replica_name, "--at", &t, "--to", out.to_str().unwrap()]);
    assert!(st.success(), "restore failed: {err}");
    let d = diff_snapshots(&manifest, &snapshot(&out, Compare::default()));
    assert!(d.is_empty(), "the restored tree is not the tree at {t}:\n{d}");

    // One file alone, with its old bytes and attributes, under its old name.
    let one = dir.join("one");
    let (st, _, err) = run(
        home,
        &[
            "history",
            "restore",
            replica_name,
            "--at",
            &t,
            "--to",
            one.to_str().unwrap(),
            "--path",
            "docs/f04.txt",
        ],
    );
    assert!(st.success(), "single-file restore failed: {err}");
    let got = snapshot(&one, Compare::default());
    assert_eq!(got.get("docs/f04.txt"), manifest.get("docs/f04.txt"));
    assert_eq!(got.keys().collect::<Vec<_>>(), [".", "docs", "docs/f04.txt"], "only that file");

    // The listing: a window that holds T.
    let (st, out_json, err) = run(home, &["history", "list", replica_name, "--json"]);
    assert!(st.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out_json).unwrap();
    let oldest = v["window"]["oldest"]["time"].as_str().unwrap().to_string();
    assert!(oldest < t && v["window"]["newest"]["seq"].as_u64().unwrap() > 0, "{v}");
    assert!(v["points"].is_array() && v["bytes"].as_u64().unwrap() > 0, "{v}");

    // Bad input: a clear error, nothing changed.
    let (st, _, err) =
        run(home, &["history", "restore", replica_name, "--at", &t, "--to", out.to_str().unwrap()]);
    assert!(!st.success() && err.contains("is not empty"), "{err}");
    assert!(
        diff_snapshots(&manifest, &snapshot(&out, Compare::default())).is_empty(),
        "a refused restore changed the directory"
    );
    let early = dir.join("early");
    let (st, _, err) = run(
        home,
        &[
            "history",
            "restore",
            replica_name,
            "--at",
            "2001-01-01T00:00:00Z",
            "--to",
            early.to_str().unwrap(),
        ],
    );
    assert!(!st.success() && err.contains("before the history held (points"), "{err}");
    assert!(!early.exists(), "a refused restore left its directory");
    let (st, _, err) = run(
        home,
        &["history", "restore", replica_name, "--at", "no-such-mark", "--to", early.to_str().unwrap()],
    );
    assert!(!st.success() && err.contains("no bookmark \"no-such-mark\""), "{err}");
    let unknown = if replica_name.contains('/') { "nosuch/job" } else { "nosuch" };
    let (st, _, err) = run(home, &["history", "list", unknown]);
    assert!(!st.success() && err.contains(&format!("unknown replica {unknown}")), "{err}");
}

#[test]
fn ransomware_on_an_embedded_replica_is_undone_by_restoring_the_point_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let (src, replica, home) = (dir.path().join("src"), dir.path().join("replica"), dir.path().join("home"));
    tree(&src);
    let mut agent = Proc::start(
        &home,
        "agent",
        &["protect", src.to_str().unwrap(), "--to", replica.to_str().unwrap(), "--capture", "inotify"],
    );
    restore_checks(dir.path(), &src, &replica, &home, "src", &mut agent);
    // The source's status shows the embedded replica's history.
    let st = job_status(&home, "src");
    assert!(st["history"]["bytes"].as_u64().unwrap_or(0) > 0, "{st}");
    let (_, text, _) = run(&home, &["status"]);
    assert!(text.contains("HISTORY: points "), "{text}");
    // A time ago as the README writes it (`--at -2h`), not only `--at=-2h`: `-0s` is the
    // latest point, the one `now` restores.
    let (ago, now) = (dir.path().join("ago"), dir.path().join("now"));
    for (at, to) in [("-0s", &ago), ("now", &now)] {
        let (st, _, err) =
            run(&home, &["history", "restore", "src", "--at", at, "--to", to.to_str().unwrap()]);
        assert!(st.success(), "restore --at {at}: {err}");
    }
    compare_trees(&now, &ago, Compare::default()).unwrap();
    // Into the replica itself: refused before anything is written there.
    let inside = replica.join("restored");
    let (st, _, err) =
        run(&home, &["history", "restore", "src", "--at", "now", "--to", inside.to_str().unwrap()]);
    assert!(!st.success() && err.contains("is inside the replica"), "{err}");
    assert!(!inside.exists());
    // A restore that runs out of space: non-zero, the cause named, nothing left behind.
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(mounted.success(), "cannot mount a small tmpfs (tests run as root)");
    let (st, _, err) =
        run(&home, &["history", "restore", "src", "--at", "now", "--to", small.to_str().unwrap()]);
    let left: Vec<_> = std::fs::read_dir(&small).unwrap().collect();
    let _ = std::process::Command::new("umount").arg(&small).status();
    assert!(!st.success() && err.contains("No space left on device"), "{err}");
    assert!(left.is_empty(), "a failed restore left {} entries", left.len());
    assert!(agent.stop().success(), "{}", agent.log());
}

#[test]
fn ransomware_on_a_remote_replica_is_undone_by_restoring_the_point_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let home = dir.path().join("source-home");
    tree(&src);
    let source_id = init(&home);
    let target = start_target(dir.path(), &[("web1", &source_id)], 0);
    let mut agent = target.protect(&home, "agent", &src, &["--name", "www", "--capture", "inotify"]);
    let replica = target.data.join("replicas/web1/www");
    restore_checks(dir.path(), &src, &replica, &target.proc.home, "web1/www", &mut agent);
    // The target's status shows the window held and the disk it takes.
    let st = replica_status(&target.proc.home);
    let h = &st["history"];
    assert!(
        h["oldest_point"].is_u64() && h["bytes"].as_u64().unwrap() > 0 && h["keep_secs"] == 86400,
        "{st}"
    );
    let (_, text, _) = run(&target.proc.home, &["status"]);
    assert!(text.contains("HISTORY: points "), "{text}");
}

#[test]
fn a_job_moved_to_another_directory_starts_a_history_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let home = dir.path().join("home");
    tree(&src);
    let to = |p: &Path| p.to_str().unwrap().to_string();
    let (first, second) = (dir.path().join("first"), dir.path().join("second"));
    let mut agent = Proc::start(&home, "agent", &["protect", &to(&src), "--to", &to(&first)]);
    wait_converged(&src, &first, Duration::from_secs(60), &mut agent);
    std::fs::write(src.join("a.txt"), b"changed before the move").unwrap();
    wait_converged(&src, &first, Duration::from_secs(60), &mut agent);
    assert!(agent.stop().success(), "{}", agent.log());
    let moved = jiff::Timestamp::now();
    let mut agent = Proc::start(&home, "agent2", &["protect", &to(&src), "--to", &to(&second)]);
    wait_converged(&src, &second, Duration::from_secs(60), &mut agent);
    // The old replica's history was read as the new one's: its points listed, and restored
    // from the wrong tree. Now the window starts after the move, and the old history is kept.
    let (st, out, err) = run(&home, &["history", "list", "src", "--json"]);
    assert!(st.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let oldest: jiff::Timestamp = v["window"]["oldest"]["time"].as_str().unwrap().parse().unwrap();
    assert!(oldest >= moved, "the window starts at {oldest}, before the move at {moved}: {out}");
    let kept = std::fs::read_dir(home.join("jobs/src"))
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("embedded-target.before-"));
    assert!(kept, "the old replica's history is set aside, not deleted");
    assert!(agent.stop().success(), "{}", agent.log());
}
