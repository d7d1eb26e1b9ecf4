//! The fuse capture daemon must not run out of descriptors because applications touched many
//! files: it used to hold one per inode the kernel caches, so creating more files than its
//! `RLIMIT_NOFILE` through the mount failed with "Too many open files".

mod common;

use std::fs;
use std::io::{Read, Write};
use std::time::Duration;

use common::*;

/// The agent's open-file limit, from `/proc/PID/limits`: (soft, hard).
fn nofile_of(pid: u32) -> (u64, u64) {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("a Max open files line");
    let nums: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    (nums[0], nums[1])
}

fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn more_files_than_the_agents_open_file_limit_go_through_the_mount() {
    if !fuse_available() {
        return;
    }
    const LIMIT: u64 = 512;
    const FILES: usize = 3000;
    const HELD: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let src = fs::canonicalize(dir.path()).unwrap().join("src");
    let replica = dir.path().join("replica");
    let home = dir.path().join("home");
    fs::create_dir_all(&src).unwrap();
    let args = ["protect", src.to_str().unwrap(), "--to", replica.to_str().unwrap(), "--capture", "fuse"];
    let mut agent = Proc::start(&home, "agent", &args);
    wait_until(Duration::from_secs(60), "the capture mount", || {
        assert!(agent.running(), "agent exited: {}", agent.log());
        let s = job_status(&home, "src");
        (s["state"] == "replicating" && capture_mount_live(&src)).then_some(()).ok_or(s.to_string())
    });
    // Lowered from outside once the agent runs (lowering needs no privilege, and an agent
    // that could raise its hard limit at start would otherwise dodge the test).
    let pid = agent.child.id();
    let low = rustix::process::Rlimit { current: Some(LIMIT), maximum: Some(LIMIT) };
    rustix::process::prlimit(
        rustix::process::Pid::from_raw(pid as i32),
        rustix::process::Resource::Nofile,
        low,
    )
    .unwrap();
    assert_eq!(nofile_of(pid), (LIMIT, LIMIT));

    // Files an application keeps open meanwhile also cost the daemon a descriptor each.
    let held: Vec<fs::File> = (0..HELD)
        .map(|i| {
            let mut f = fs::File::create(src.join(format!("held{i}"))).unwrap();
            f.write_all(format!("held {i}\n").as_bytes()).unwrap();
            f
        })
        .collect();
    for d in 0..10 {
        fs::create_dir(src.join(format!("d{d}"))).unwrap();
    }
    let mut max_fds = 0;
    for i in 0..FILES {
        let p = src.join(format!("d{}/f{i}", i % 10));
        let mut f =
            fs::File::create(&p).unwrap_or_else(|e| panic!("creating file {i} ({}): {e}", p.display()));
        f.write_all(format!("file {i}\n").as_bytes()).unwrap_or_else(|e| panic!("writing file {i}: {e}"));
        drop(f);
        if i % 100 == 0 {
            max_fds = max_fds.max(open_fds(pid));
        }
    }
    // Every one is still reachable through the mount (lookups and reads of cached inodes,
    // whose descriptors the daemon had to give back).
    for i in 0..FILES {
        let p = src.join(format!("d{}/f{i}", i % 10));
        let mut s = String::new();
        fs::File::open(&p)
            .and_then(|mut f| f.read_to_string(&mut s))
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(s, format!("file {i}\n"));
        fs::symlink_metadata(&p).unwrap();
    }
    for (i, mut f) in held.into_iter().enumerate() {
        f.write_all(b"more\n").unwrap_or_else(|e| panic!("held file {i}: {e}"));
    }
    max_fds = max_fds.max(open_fds(pid));
    println!(
        "{FILES} files created under a limit of {LIMIT}; at most {max_fds} descriptors open in the agent"
    );
    assert!(max_fds <= LIMIT as usize);
    wait_converged(&src, &replica, Duration::from_secs(120), &mut agent);
    let log = agent.log();
    assert!(!log.contains("Too many open files") && !log.contains("paused"), "{log}");
    assert!(agent.stop().success(), "{}", agent.log());
}
