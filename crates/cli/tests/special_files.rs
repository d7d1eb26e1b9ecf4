//! Device nodes, FIFOs and sockets on the source, through both capture modes: FIFOs and
//! sockets are replicated; a device node follows the target's `devices` policy. Refused, it
//! is reported once (one warning, however often the source touches it), listed by the
//! target's status, and `verify` does not call the replica equal; allowed, it is replicated
//! with its device number.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// /dev/null's device number.
const NULL_RDEV: u64 = (1 << 8) | 3;

fn make_specials(dir: &Path) {
    let mknod = |name: &str, kind: rustix::fs::FileType, dev: u64| {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.join(name),
            kind,
            rustix::fs::Mode::from_raw_mode(0o644),
            dev,
        )
        .unwrap_or_else(|e| panic!("mknod {name}: {e}"));
    };
    mknod("null", rustix::fs::FileType::CharacterDevice, NULL_RDEV);
    mknod("fifo", rustix::fs::FileType::Fifo, 0);
    let _socket = std::os::unix::net::UnixListener::bind(dir.join("socket")).unwrap();
}

fn replica_row(target_home: &Path) -> Value {
    let (st, out, err) = run(target_home, &["status", "--json"]);
    assert!(st.success(), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["replicas"][0].clone()
}

fn run_case(capture: &str, devices: &str) {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("src-home");
    let id = init(&home);
    let config = format!("[[target.allow]]\nname = \"web\"\nid = \"{id}\"\ndevices = \"{devices}\"\n");
    let data = dir.path().join("target-data");
    let target = start_target_config(dir.path(), &config, "127.0.0.1:0", &data, None);
    let src = dir.path().join("src");
    Tree::at(&src).file("plain", b"plain\n");
    // What the killed agent's mount leaves at `src` goes before the directory does.
    let _mount = StaleMountGuard(std::fs::canonicalize(&src).unwrap());
    if capture == "watch" {
        make_specials(&src);
    }
    let mut agent = target.protect(&home, "agent", &src, &["--name", "www", "--capture", capture]);
    let replica = data.join("replicas/web/www");
    wait_until(Duration::from_secs(60), "the agent to replicate", || {
        agent.running().then_some(()).ok_or(agent.log())?;
        (job_status(&home, "www")["state"] == "replicating").then_some(()).ok_or("not yet".to_string())
    });
    if capture == "fuse" {
        make_specials(&src);
    }
    // The source touches the device node again and again.
    for i in 0..50 {
        std::fs::set_permissions(
            src.join("null"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600 + i % 2),
        )
        .unwrap();
    }
    std::fs::write(src.join("last"), b"after the device node\n").unwrap();
    wait_until(Duration::from_secs(60), "the replica to catch up", || {
        std::fs::read(replica.join("last")).map_err(|e| e.to_string())
    });
    let fifo = std::fs::symlink_metadata(replica.join("fifo")).unwrap();
    assert!(fifo.file_type().is_fifo(), "{fifo:?}");
    assert!(std::fs::symlink_metadata(replica.join("socket")).unwrap().file_type().is_socket());
    let row = replica_row(&target.proc.home);
    let (_, verify, verr) = run(&home, &["verify", "www"]);
    if devices == "allow" {
        let null = std::fs::symlink_metadata(replica.join("null")).unwrap();
        assert!(null.file_type().is_char_device() && null.rdev() == NULL_RDEV, "{null:?}");
        assert_eq!(row["unreplicated_count"], Value::Null, "{row}");
        assert!(verify.contains("replica matches the source"), "{verify}{verr}");
        return;
    }
    assert!(std::fs::symlink_metadata(replica.join("null")).is_err(), "refused, yet on the replica");
    assert_eq!(row["unreplicated_count"], 1, "{row}");
    assert_eq!(row["unreplicated"][0]["path"], "null", "{row}");
    assert!(row["unreplicated"][0]["reason"].as_str().unwrap().contains("device"), "{row}");
    // One warning for the name, however often the source touched it.
    let refusals = agent.log().lines().filter(|l| l.contains("the target refused an op")).count();
    assert_eq!(refusals, 1, "{}", agent.log());
    let target_log = target.proc.log();
    let warned = target_log.lines().filter(|l| l.contains("refused")).count();
    assert_eq!(warned, 1, "{target_log}");
    // verify does not call the replica equal, and says which name differs.
    assert!(verify.contains("null") && verify.contains("differences found"), "{verify}{verr}");
    let (st, text, _) = run(&target.proc.home, &["status"]);
    assert!(st.success() && text.contains("NOT REPLICATED: 1 names") && text.contains("null:"), "{text}");
}

#[test]
fn watch_capture_device_nodes_follow_the_refuse_policy() {
    run_case("watch", "refuse");
}

#[test]
fn watch_capture_device_nodes_follow_the_allow_policy() {
    run_case("watch", "allow");
}

#[test]
fn fuse_capture_device_nodes_follow_the_refuse_policy() {
    if !fuse_available() {
        return;
    }
    run_case("fuse", "refuse");
}
