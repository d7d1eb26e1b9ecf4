//! Upgrading in place: the state a release of on-disk format 1 left behind (made by
//! `fixtures/make-format-1.sh` with that release) is taken over by this build without a
//! re-mirror, and a state directory of a newer format is refused with both versions named.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Unpacks the format-1 fixture into `dir` (owners, modes, times and xattrs kept).
fn unpack(dir: &Path) {
    let tar = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-1.tar.gz");
    let st = Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xzpf"])
        .arg(&tar)
        .arg("-C")
        .arg(dir)
        .status()
        .expect("run tar");
    assert!(st.success(), "tar could not unpack {}", tar.display());
}

/// Points a job's saved destination at where the fixture now lives (the release wrote the
/// address and paths of the machine it ran on; an upgrade in place keeps them).
fn set_dest(home: &Path, job: &str, dest: &str) -> Value {
    let path = home.join("jobs").join(job).join("state.json");
    let mut state: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    state["dest"] = Value::String(dest.to_string());
    fs::write(&path, serde_json::to_vec_pretty(&state).unwrap()).unwrap();
    state
}

fn id(home: &Path) -> String {
    let (st, out, err) = run(home, &["id"]);
    assert!(st.success(), "doppel id: {err}");
    out.trim().to_string()
}

fn replica_id_of(checkpoint: &Path) -> Value {
    let c: Value = serde_json::from_slice(&fs::read(checkpoint).unwrap()).unwrap();
    c["replica_id"].clone()
}

/// Waits until the agent of `job` has every captured op acknowledged, and returns its log.
fn settled(home: &Path, job: &str, agent: &mut Proc) {
    wait_until(Duration::from_secs(60), "the job to catch up", || {
        assert!(agent.running(), "agent exited; log:\n{}", agent.log());
        let s = job_status(home, job);
        let (acked, captured) = (s["last_acked_seq"].as_u64(), s["last_captured_seq"].as_u64());
        if s["state"] == "replicating" && acked.is_some() && acked == captured {
            Ok(())
        } else {
            Err(format!("{s}"))
        }
    });
}

fn assert_no_remirror(log: &str) {
    assert!(log.contains("clean restart"), "the job did not resume as a clean restart; log:\n{log}");
    assert!(!log.contains("comparing the whole tree"), "the job re-mirrored the whole tree; log:\n{log}");
}

#[test]
fn state_of_format_1_is_taken_over_without_a_remirror() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().canonicalize().unwrap();
    unpack(&d);
    let (src, home) = (d.join("src"), d.join("source-home"));
    let replica = d.join("target-data/replicas/s1/www");
    let checkpoint = d.join("target-data/state/s1/www/checkpoint.json");
    let before = replica_id_of(&checkpoint);
    let applied_before = serde_json::from_slice::<Value>(&fs::read(&checkpoint).unwrap()).unwrap()["applied"]
        .as_u64()
        .unwrap();

    // The remote job: ops the old release left in its spool go out first, then the tree.
    let src_id = id(&home);
    let target = start_target_with(&d, &[("s1", &src_id)], "127.0.0.1:0", &d.join("target-data"), None);
    let state = set_dest(&home, "www", &format!("{} (target {})", target.addr, target.id));
    assert_eq!(state["replica_id"], before, "the fixture's agent and target agree on the replica");
    let src_arg = src.to_string_lossy().into_owned();
    let mut agent = Proc::start(
        &home,
        "www",
        &["protect", &src_arg, "--to", &target.addr, "--target-id", &target.id, "--name", "www"],
    );
    wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);
    settled(&home, "www", &mut agent);
    let status = job_status(&home, "www");
    assert!(
        status["last_acked_seq"].as_u64().unwrap() > applied_before,
        "the ops left in the old spool were sent after sequence {applied_before}: {status}"
    );
    fs::write(src.join("after-upgrade.txt"), b"written by the new build's watch\n").unwrap();
    wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);
    assert_no_remirror(&agent.log());
    // Format 1's whole-file index was taken over by the index store, then removed.
    assert!(agent.log().contains("index taken over from the earlier format"), "{}", agent.log());
    assert!(!home.join("jobs/www/index.bin").exists() && home.join("jobs/www/index.redb").exists());
    assert_eq!(replica_id_of(&checkpoint), before, "the replica kept its identity");
    assert!(agent.stop().success(), "clean stop; log:\n{}", agent.log());

    // The embedded job to a local directory.
    let local = d.join("local");
    let local_arg = local.to_string_lossy().into_owned();
    set_dest(&home, "local", &local_arg);
    let mut agent =
        Proc::start(&home, "local", &["protect", &src_arg, "--to", &local_arg, "--name", "local"]);
    wait_converged(&src, &local, Duration::from_secs(60), &mut agent);
    assert_no_remirror(&agent.log());
    assert!(agent.stop().success(), "clean stop; log:\n{}", agent.log());

    // Every state directory now carries the current format's stamp.
    for (stamp, want) in [
        ("source-home/jobs/www/FORMAT", "doppel-job 2\n"),
        ("source-home/jobs/local/FORMAT", "doppel-job 2\n"),
        ("source-home/jobs/local/embedded-target/FORMAT", "doppel-replica 1\n"),
        ("target-data/FORMAT", "doppel-target 1\n"),
        ("target-data/state/s1/www/FORMAT", "doppel-replica 1\n"),
    ] {
        assert_eq!(fs::read_to_string(d.join(stamp)).unwrap_or_default(), want, "{stamp}");
    }
}

#[test]
fn a_state_directory_of_a_newer_format_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().canonicalize().unwrap();
    unpack(&d);
    let home = d.join("source-home");
    let local = d.join("local").to_string_lossy().into_owned();
    set_dest(&home, "local", &local);
    let job_dir = home.join("jobs/local");
    fs::write(job_dir.join("FORMAT"), "doppel-job 3\n").unwrap();
    let state_before = fs::read(job_dir.join("state.json")).unwrap();
    let src = d.join("src").to_string_lossy().into_owned();
    let (st, _, err) = run(&home, &["protect", &src, "--to", &local, "--name", "local"]);
    assert!(!st.success(), "a newer format must be refused");
    assert!(
        err.contains("doppel-job format 3 was written by a newer doppel") && err.contains("formats 1 to 2"),
        "the error names both versions: {err}"
    );
    assert_eq!(fs::read(job_dir.join("state.json")).unwrap(), state_before, "nothing was changed");
    assert_eq!(fs::read_to_string(job_dir.join("FORMAT")).unwrap(), "doppel-job 3\n");
}
