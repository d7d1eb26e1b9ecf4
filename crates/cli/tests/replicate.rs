//! Replication end to end, with the real binary: embedded and remote destinations, every
//! kind of change, bytes on the wire, and several sources on one target.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use common::*;

const BIG: u64 = 256 << 20;

fn standard_tree(src: &Path) {
    Tree::at(src).standard();
    big_file(&src.join("big.img"), BIG, 1);
}

with_each_watch_backend!(
    embedded_destination_converges_through_every_kind_of_change,
    remote_destination_converges_through_every_kind_of_change,
    four_kib_changed_in_a_256_mib_file_sends_less_than_1_mib,
    two_sources_on_one_target_stay_isolated,
);

/// `doppel protect SRC ARGS… --capture BACKEND`.
fn protect<'a>(src: &'a Path, args: &[&'a str], watch: Watch) -> Vec<&'a str> {
    let mut v = vec!["protect", src.to_str().unwrap()];
    v.extend_from_slice(args);
    v.extend(watch.args());
    v
}

fn embedded_destination_converges_through_every_kind_of_change(watch: Watch) {
    let dir = tempfile::tempdir().unwrap();
    let (src, replica, home) = (dir.path().join("src"), dir.path().join("replica"), dir.path().join("home"));
    standard_tree(&src);
    let mut agent = Proc::start(&home, "agent", &protect(&src, &["--to", replica.to_str().unwrap()], watch));
    wait_converged(&src, &replica, Duration::from_secs(180), &mut agent);
    let st = job_status(&home, "src");
    assert_eq!(st["state"], "replicating", "{st}");
    churn(&src);
    wait_converged(&src, &replica, Duration::from_secs(120), &mut agent);
    assert!(agent.stop().success(), "{}", agent.log());
    // The replica holds nothing but the tree: no state files inside it.
    assert!(snapshot(&replica, Compare::default()).keys().all(|k| !k.contains("doppel")));
}

fn remote_destination_converges_through_every_kind_of_change(watch: Watch) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let home = dir.path().join("source-home");
    standard_tree(&src);
    let source_id = init(&home);
    let target = start_target(dir.path(), &[("web1", &source_id)], 0);
    let mut agent = Proc::start(
        &home,
        "agent",
        &protect(&src, &["--to", &target.addr, "--target-id", &target.id, "--name", "www"], watch),
    );
    let replica = target.data.join("replicas/web1/www");
    wait_converged(&src, &replica, Duration::from_secs(180), &mut agent);
    churn(&src);
    wait_converged(&src, &replica, Duration::from_secs(120), &mut agent);
    // The target's own status knows the replica.
    let (st, out, _) = run(&target.proc.home, &["status", "--json"]);
    assert!(st.success());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = &v["replicas"][0];
    assert_eq!(
        (r["source"].as_str(), r["job"].as_str(), r["connected"].as_bool()),
        (Some("web1"), Some("www"), Some(true)),
        "{v}"
    );
    // Nothing but the replica tree lives under replicas/SOURCE/JOB.
    let names: Vec<String> = std::fs::read_dir(target.data.join("replicas/web1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["www"]);
    assert!(agent.stop().success(), "{}", agent.log());
}

fn four_kib_changed_in_a_256_mib_file_sends_less_than_1_mib(watch: Watch) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let home = dir.path().join("source-home");
    std::fs::create_dir_all(&src).unwrap();
    big_file(&src.join("disk.img"), BIG, 2);
    let source_id = init(&home);
    let target = start_target(dir.path(), &[("s", &source_id)], 0);
    let mut agent = Proc::start(
        &home,
        "agent",
        &protect(&src, &["--to", &target.addr, "--target-id", &target.id], watch),
    );
    let replica = target.data.join("replicas/s/src");
    wait_converged(&src, &replica, Duration::from_secs(180), &mut agent);
    // Let the post-mirror acks settle, then measure.
    wait_until(Duration::from_secs(30), "the spool to drain", || {
        let s = job_status(&home, "src");
        (s["last_acked_seq"] == s["last_captured_seq"]).then_some(()).ok_or(s.to_string())
    });
    let before = bytes_sent(&home, "src");
    assert!(before > BIG / 2, "the initial mirror sent only {before} bytes (compressed?)");
    let f = std::fs::OpenOptions::new().write(true).open(src.join("disk.img")).unwrap();
    f.write_all_at(&noise(99, 4096), BIG / 2 + 12345).unwrap();
    drop(f);
    wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);
    let sent = bytes_sent(&home, "src") - before;
    println!("4 KiB change in a 256 MiB file: {sent} bytes on the wire");
    assert!(sent < 1 << 20, "sent {sent} bytes for a 4 KiB change");
}

fn two_sources_on_one_target_stay_isolated(watch: Watch) {
    let dir = tempfile::tempdir().unwrap();
    let (src1, src2) = (dir.path().join("one/data"), dir.path().join("two/data"));
    let (home1, home2) = (dir.path().join("home1"), dir.path().join("home2"));
    Tree::at(&src1).standard().file("only-in-one", b"1");
    Tree::at(&src2)
        .file("a.txt", b"source two's a.txt")
        .file("dir1/x", &noise(8, 50_000))
        .file("only-in-two", b"2");
    let (id1, id2) = (init(&home1), init(&home2));
    let target = start_target(dir.path(), &[("one", &id1), ("two", &id2)], 0);
    // Same job name on both sources: the replicas are still separate.
    let mut a1 = Proc::start(
        &home1,
        "agent",
        &protect(&src1, &["--to", &target.addr, "--target-id", &target.id], watch),
    );
    let mut a2 = Proc::start(
        &home2,
        "agent",
        &protect(&src2, &["--to", &target.addr, "--target-id", &target.id], watch),
    );
    let (r1, r2) = (target.data.join("replicas/one/data"), target.data.join("replicas/two/data"));
    wait_converged(&src1, &r1, Duration::from_secs(60), &mut a1);
    wait_converged(&src2, &r2, Duration::from_secs(60), &mut a2);
    churn(&src1);
    Tree::at(&src2).file("a.txt", b"changed on two");
    wait_converged(&src1, &r1, Duration::from_secs(60), &mut a1);
    wait_converged(&src2, &r2, Duration::from_secs(60), &mut a2);
    assert!(!r1.join("only-in-two").exists() && !r2.join("only-in-one").exists());
}
