//! The command-line contract: what scripts rely on (output, exit status, one-line errors).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn one_line_error(err: &str) -> &str {
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("doppel: error:")).collect();
    assert_eq!(lines.len(), 1, "expected exactly one error line, got:\n{err}");
    lines[0]
}

#[test]
fn init_is_idempotent_and_id_prints_the_identity_alone() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("h");
    let (st, _, err) = run(&home, &["id"]);
    assert!(!st.success());
    assert!(one_line_error(&err).contains("doppel init"), "{err}");
    let a = init(&home);
    let b = init(&home);
    assert_eq!(a, b);
    let (st, out, _) = run(&home, &["id"]);
    assert!(st.success());
    assert_eq!(out, format!("{a}\n"));
    assert_eq!(a.len(), 64);
    assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    // DOPPEL_HOME is honoured when --home is absent.
    let out = std::process::Command::new(doppel()).arg("id").env("DOPPEL_HOME", &home).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), a);
}

#[test]
fn config_errors_name_the_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("doppel.toml");
    std::fs::write(&cfg, "[target]\nlisten = \"127.0.0.1:0\"\ndata = \"/tmp/x\"\nallow_all = true\n")
        .unwrap();
    let (st, _, err) = run(dir.path(), &["--config", cfg.to_str().unwrap(), "status"]);
    assert!(!st.success());
    let line = one_line_error(&err);
    assert!(line.contains("doppel.toml:4: unknown key allow_all"), "{line}");
}

#[test]
fn protect_usage_errors_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let (st, _, err) = run(dir.path(), &["protect", src.to_str().unwrap()]);
    assert!(!st.success());
    assert!(one_line_error(&err).contains("--to DEST is required"), "{err}");
    let (st, _, err) = run(dir.path(), &["protect", "/nonexistent/dir", "--to", "/tmp/r"]);
    assert!(!st.success());
    assert!(one_line_error(&err).contains("/nonexistent/dir"), "{err}");
    let (st, _, err) = run(dir.path(), &["protect", src.to_str().unwrap(), "--to", "host:7340"]);
    assert!(!st.success());
    assert!(one_line_error(&err).contains("--target-id"), "{err}");
    let inside = src.join("replica");
    let (st, _, err) = run(dir.path(), &["protect", src.to_str().unwrap(), "--to", inside.to_str().unwrap()]);
    assert!(!st.success());
    assert!(one_line_error(&err).contains("must not contain one another"), "{err}");
    assert!(!inside.exists(), "the refused destination was made inside the protected tree");
    // A destination beneath a file: the cause once, not twice.
    let file = dir.path().join("afile");
    std::fs::write(&file, b"x").unwrap();
    let (st, _, err) =
        run(dir.path(), &["protect", src.to_str().unwrap(), "--to", file.join("r").to_str().unwrap()]);
    assert!(!st.success());
    let line = one_line_error(&err);
    assert_eq!(line.matches("Not a directory").count(), 1, "{line}");
    let (st, _, err) =
        run(dir.path(), &["protect", src.to_str().unwrap(), "--to", "/tmp/r", "--fuse-writeback"]);
    assert!(!st.success());
    assert!(one_line_error(&err).contains("--fuse-writeback needs --capture fuse"), "{err}");
    // A mistyped port is not a directory to create and mirror into.
    let (st, err) = refused(dir.path(), &["protect", src.to_str().unwrap(), "--to", "127.0.0.1:99999"]);
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(one_line_error(&err).contains("must be a number from 1 to 65535"), "{err}");
    // History settings apply to a --to DIR replica; a target's are its own.
    let id = "ab".repeat(32);
    let args = ["protect", src.to_str().unwrap(), "--to", "host:7340", "--target-id", &id, "--history", "2d"];
    let (st, err) = refused(dir.path(), &args);
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(one_line_error(&err).contains("set a --to DIR replica's history"), "{err}");
}

#[test]
fn an_unlisted_source_is_refused_with_its_identity_named() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    Tree::at(&src).file("f", b"x");
    let home = dir.path().join("source-home");
    let id = init(&home);
    let target = start_target(dir.path(), &[], 0);
    let mut agent = Proc::start(
        &home,
        "agent",
        &["protect", src.to_str().unwrap(), "--to", &target.addr, "--target-id", &target.id],
    );
    let st = agent.wait(Duration::from_secs(60));
    assert!(!st.success());
    let log = agent.log();
    let line = one_line_error(&log);
    assert!(line.contains("does not allow source identity") && line.contains(&id), "{line}");
    assert!(
        !target.data.join("replicas").exists()
            || std::fs::read_dir(target.data.join("replicas")).unwrap().next().is_none()
    );
    // One job refused among others: the others go on.
    let local = dir.path().join("local-replica");
    let cfg = dir.path().join("two-jobs.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[job]]\nname = \"refused\"\npath = {src:?}\nto = {addr:?}\ntarget_id = {tid:?}\n\n\
             [[job]]\nname = \"local\"\npath = {src:?}\nto = {local:?}\n",
            addr = target.addr,
            tid = target.id,
        ),
    )
    .unwrap();
    let mut both = Proc::start(&home, "agent-two-jobs", &["--config", cfg.to_str().unwrap(), "protect"]);
    wait_until(Duration::from_secs(60), "the refused job to stop", || {
        let log = both.log();
        log.contains("job stopped; the agent's other jobs go on").then_some(()).ok_or(log)
    });
    Tree::at(&src).file("after", b"made after the refusal");
    wait_converged(&src, &local, Duration::from_secs(30), &mut both);
    assert!(!both.stop().success(), "the refused job's error is the agent's exit status");
    // And a source pinning the wrong target identity never sends anything.
    let wrong = "ab".repeat(32);
    let mut agent = Proc::start(
        &home,
        "agent-wrong-pin",
        &["protect", src.to_str().unwrap(), "--to", &target.addr, "--target-id", &wrong],
    );
    wait_until(Duration::from_secs(30), "the pin mismatch to be reported", || {
        let s = job_status(&home, "src");
        let d = s["detail"].as_str().unwrap_or_default().to_string();
        d.contains("does not match the pinned identity").then_some(()).ok_or(s.to_string())
    });
    assert!(agent.stop().success());
}

#[test]
fn one_job_one_agent() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    Tree::at(&src).file("f", b"x");
    let home = dir.path().join("home");
    let replica = dir.path().join("replica");
    let mut a =
        Proc::start(&home, "agent", &["protect", src.to_str().unwrap(), "--to", replica.to_str().unwrap()]);
    wait_converged(&src, &replica, Duration::from_secs(30), &mut a);
    let (st, _, err) = run(&home, &["protect", src.to_str().unwrap(), "--to", replica.to_str().unwrap()]);
    assert!(!st.success());
    assert!(one_line_error(&err).contains("already being protected"), "{err}");
    assert!(a.stop().success());
    let s = job_status(&home, "src");
    assert_eq!(s["state"], "stopped", "{s}");
}

#[test]
fn verify_reports_and_repairs_differences() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    Tree::at(&src).standard();
    big_file(&src.join("disk.img"), 8 << 20, 4);
    let home = dir.path().join("home");
    let replica = dir.path().join("replica");
    let mut a =
        Proc::start(&home, "agent", &["protect", src.to_str().unwrap(), "--to", replica.to_str().unwrap()]);
    wait_converged(&src, &replica, Duration::from_secs(60), &mut a);
    let (st, out, err) = run(&home, &["verify", "src"]);
    assert!(st.success(), "{out}{err}");
    assert!(out.contains("replica matches the source"), "{out}");
    // Damage the replica behind doppel's back.
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(replica.join("disk.img")).unwrap(),
        b"rot",
        5 << 20,
    )
    .unwrap();
    std::fs::write(replica.join("stray"), b"not on the source").unwrap();
    std::fs::remove_file(replica.join("dir2/e")).unwrap();
    std::fs::remove_file(replica.join("link-rel")).unwrap();
    std::os::unix::fs::symlink("elsewhere", replica.join("link-rel")).unwrap();
    let (st, out, _) = run(&home, &["verify", "src", "--json"]);
    assert!(!st.success(), "differences must fail verify");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let diffs: Vec<(String, String)> = v["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["path"].as_str().unwrap().to_string(), d["what"].as_str().unwrap().to_string()))
        .collect();
    let find = |p: &str| diffs.iter().find(|(q, _)| q == p).map(|(_, w)| w.clone()).unwrap_or_default();
    // The content's own mtime is not a difference of its own (nor a privileged one).
    assert_eq!(find("disk.img"), "content differs (65536 bytes)", "{diffs:?}");
    assert_eq!(find("stray"), "only on the replica", "{diffs:?}");
    assert_eq!(find("dir2/e"), "missing on the replica", "{diffs:?}");
    assert_eq!(find("link-rel"), "link target differs", "{diffs:?}");
    let (st, out, err) = run(&home, &["verify", "src", "--repair"]);
    assert!(st.success(), "{out}{err}");
    wait_converged(&src, &replica, Duration::from_secs(30), &mut a);
    let (st, out, _) = run(&home, &["verify", "src"]);
    assert!(st.success() && out.contains("replica matches the source"), "{out}");
}

#[test]
fn verify_repairs_a_hard_linked_file_damaged_on_the_replica() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("shl");
    Tree::at(&src).file("f", b"original\n").hardlink("g", "f");
    let home = dir.path().join("home");
    let replica = dir.path().join("rhl");
    let mut a =
        Proc::start(&home, "agent", &["protect", src.to_str().unwrap(), "--to", replica.to_str().unwrap()]);
    wait_converged(&src, &replica, Duration::from_secs(60), &mut a);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let source_mode = mode(&src.join("f"));
    // Damaged behind doppel's back, through one name (so both names see it): the bytes, then
    // the mode alone.
    let damage: [&dyn Fn(); 2] = [&|| std::fs::write(replica.join("f"), b"CORRUPT\n").unwrap(), &|| {
        std::fs::set_permissions(replica.join("f"), PermissionsExt::from_mode(0o600)).unwrap()
    }];
    for damage in damage {
        damage();
        let (st, out, _) = run(&home, &["verify", "shl"]);
        assert!(!st.success(), "the damage must be found: {out}");
        let (st, out, err) = run(&home, &["verify", "shl", "--repair"]);
        assert!(st.success(), "{out}{err}");
        wait_converged(&src, &replica, Duration::from_secs(30), &mut a);
        let (st, out, _) = run(&home, &["verify", "shl"]);
        assert!(st.success() && out.contains("replica matches the source"), "{out}");
        assert_eq!(std::fs::read(replica.join("f")).unwrap(), b"original\n");
        assert_eq!(mode(&replica.join("f")), source_mode);
        let (f, g) = (replica.join("f").metadata().unwrap(), replica.join("g").metadata().unwrap());
        assert_eq!((f.dev(), f.ino()), (g.dev(), g.ino()), "both names stay one file");
        // A repair in place moves nothing into the history's attic.
        assert_eq!(f.nlink(), 2, "links to the replica's file beyond its two names");
    }
}

#[test]
fn a_report_whose_reader_goes_away_ends_as_other_tools_do_without_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("h");
    init(&home);
    for args in [&["status"][..], &["id"][..]] {
        // `doppel status | head -0`: the reader is gone before the first line is written.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new(doppel())
            .arg("--home")
            .arg(&home)
            .args(args)
            .stdout(writer)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "doppel {args:?} panicked on a closed pipe:\n{err}");
        assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "doppel {args:?}: {:?}\n{err}", out.status);
    }
}

#[test]
fn a_report_written_to_a_full_disk_is_one_error_line_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("h");
    init(&home);
    // `doppel status > file` on a full file system.
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let out = std::process::Command::new(doppel())
        .arg("--home")
        .arg(&home)
        .arg("status")
        .stdout(full)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(one_line_error(&err).contains("cannot write the output: No space left on device"), "{err}");
}

/// Runs a command expected to refuse at once; an agent that starts instead fails the test
/// after 30 s (and is killed) rather than running on.
fn refused(home: &Path, args: &[&str]) -> (std::process::ExitStatus, String) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut p = Proc::start(home, &format!("refused-{n}"), args);
    let st = p.wait(Duration::from_secs(30));
    (st, p.log())
}

#[test]
fn a_destination_holding_other_files_or_another_running_jobs_replica_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    Tree::at(&src).file("f", b"source").file("d/g", b"more");
    let to = |p: &Path| p.to_str().unwrap().to_string();
    // A directory of someone else's files: the first mirror would delete them.
    let other = dir.path().join("important");
    Tree::at(&other).file("precious.db", b"precious");
    let home = dir.path().join("home");
    let (st, err) = refused(&home, &["protect", &to(&src), "--to", &to(&other)]);
    assert_eq!(st.code(), Some(1), "{err}");
    let line = one_line_error(&err);
    assert!(
        line.contains("is not empty and is not this job's replica") && line.contains("--seeded"),
        "{err}"
    );
    assert_eq!(std::fs::read(other.join("precious.db")).unwrap(), b"precious");
    // A fresh file system's mount point holds lost+found only: taken as empty.
    let replica = dir.path().join("replica");
    std::fs::create_dir_all(replica.join("lost+found")).unwrap();
    let mut a = Proc::start(&home, "agent", &["protect", &to(&src), "--to", &to(&replica)]);
    wait_converged(&src, &replica, Duration::from_secs(30), &mut a);
    // Another job (another home, another source) aimed at that running job's replica.
    let src2 = dir.path().join("src2");
    Tree::at(&src2).file("other", b"other source");
    let home2 = dir.path().join("home2");
    let (st, err) = refused(&home2, &["protect", &to(&src2), "--to", &to(&replica), "--seeded"]);
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(one_line_error(&err).contains("is the replica of a job that is running now"), "{err}");
    compare_trees(&src, &replica, Compare::default()).unwrap();
    // The job's own replica is not empty, and is taken again after a restart.
    assert!(a.stop().success(), "{}", a.log());
    std::fs::write(src.join("f"), b"changed while stopped").unwrap();
    let mut a = Proc::start(&home, "agent2", &["protect", &to(&src), "--to", &to(&replica)]);
    wait_converged(&src, &replica, Duration::from_secs(30), &mut a);
    assert!(a.stop().success(), "{}", a.log());
    // A seed (a copy made beforehand, one file stale): adopted with --seeded, made equal.
    let seed = dir.path().join("seed");
    Tree::at(&seed).file("f", b"stale copy").file("d/g", b"more").file("gone", b"deleted since");
    let home3 = dir.path().join("home3");
    let mut a = Proc::start(&home3, "agent3", &["protect", &to(&src), "--to", &to(&seed), "--seeded"]);
    wait_converged(&src, &seed, Duration::from_secs(30), &mut a);
    assert!(a.stop().success(), "{}", a.log());
}
