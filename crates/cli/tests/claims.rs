//! Claims of the README, the architecture notes and the command-line help, each proved end to
//! end with the real binary: include and exclude rules (flags and config), `doppel protect`
//! running every `[[job]]` of the config, adaptive compression, the per-target shared
//! bandwidth limit, bandwidth schedules and `doppel limit` (kept across restarts), owner
//! changes in watch mode, sync mode degrading and recovering, and kernel passthrough reads
//! under the fuse capture.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

with_each_watch_backend!(
    exclude_and_include_flags_keep_unselected_names_off_the_replica,
    include_and_exclude_rules_of_a_config_job_apply,
    exclude_rules_hold_across_directory_renames_and_restarts,
    chown_and_chgrp_of_files_and_directories_replicate,
);

// ---------------------------------------------------------------------------------------------
// Helpers

/// Whether the replica holds exactly the names of the source that `keep` selects, equal in
/// content, mode, owner, file times and xattrs (directory times aside: excluded names
/// legitimately move them on the source only).
fn selected_equal(src: &Path, replica: &Path, keep: &dyn Fn(&str, bool) -> bool) -> Result<(), String> {
    let opts = Compare { ignore_dir_mtimes: true };
    let a: BTreeMap<_, _> =
        snapshot(src, opts).into_iter().filter(|(k, n)| k == "." || keep(k, n.kind == "dir")).collect();
    let b = snapshot(replica, opts);
    let mut diffs = Vec::new();
    for (k, na) in &a {
        match b.get(k) {
            None => diffs.push(format!("{k}: missing on replica")),
            Some(nb) if nb != na => diffs.push(format!("{k}: source {na:?} != replica {nb:?}")),
            _ => {}
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        diffs.push(format!("{k}: on the replica but not selected"));
    }
    if diffs.is_empty() { Ok(()) } else { Err(diffs.join("\n")) }
}

fn wait_selected(src: &Path, replica: &Path, keep: &dyn Fn(&str, bool) -> bool, agent: &mut Proc) {
    wait_until(Duration::from_secs(60), "the replica to hold exactly the selected names", || {
        if !agent.running() {
            panic!("agent exited early; log:\n{}", agent.log());
        }
        selected_equal(src, replica, keep)
    });
}

/// Writes `path` with `body` and a config-file path for `--config`.
fn write_config(path: &Path, body: &str) -> String {
    std::fs::write(path, body).unwrap();
    path.to_string_lossy().into_owned()
}

/// The capture name a config `[[job]]` takes for a watch back-end.
fn capture_name(watch: Watch) -> &'static str {
    match watch {
        Watch::Fanotify => "fanotify",
        Watch::Inotify => "inotify",
    }
}

/// Every job of `doppel status --json`, by name.
fn all_jobs(home: &Path) -> BTreeMap<String, Value> {
    let (st, out, err) = run(home, &["status", "--json"]);
    assert!(st.success(), "status failed: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|j| (j["job"].as_str().unwrap_or_default().to_string(), j.clone()))
        .collect()
}

/// Waits until `job` acknowledged everything it captured (nothing left to send).
fn wait_drained(home: &Path, job: &str) {
    wait_until(Duration::from_secs(60), "the spool to drain", || {
        let s = job_status(home, job);
        (s["state"] == "replicating"
            && s["last_acked_seq"] == s["last_captured_seq"]
            && s["pending_bytes"] == 0)
            .then_some(())
            .ok_or(s.to_string())
    });
}

/// Text that compresses well but is not trivially repetitive: numbered log lines.
fn log_text(size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size + 100);
    let mut i = 0u64;
    while v.len() < size {
        v.extend_from_slice(
            format!(
                "2026-12-05 04:{:02}:{:02}.{:03} INFO request {i} from 10.0.{}.{} took {} ms status={}\n",
                i / 60 % 60,
                i % 60,
                i * 7 % 1000,
                i % 251,
                i * 13 % 253,
                i * 7919 % 1000,
                [200, 200, 200, 404, 500][(i % 5) as usize]
            )
            .as_bytes(),
        );
        i += 1;
    }
    v.truncate(size);
    v
}

/// Samples the bytes sent by `jobs` (one status call) with the time it was taken.
fn sample(home: &Path, jobs: &[&str]) -> (Instant, Vec<u64>) {
    let all = all_jobs(home);
    let t = Instant::now();
    (t, jobs.iter().map(|j| all.get(*j).and_then(|s| s["bytes_sent"].as_u64()).unwrap_or(0)).collect())
}

/// Bytes each of `jobs` sent per second over `window`, counted from `start` (a sample taken
/// once the transfer was under way). The window is the measurement itself: the rate is an
/// average over it, so it is waited out rather than polled.
fn rates_over(home: &Path, jobs: &[&str], start: &(Instant, Vec<u64>), window: Duration) -> (f64, Vec<f64>) {
    std::thread::sleep(window);
    let end = sample(home, jobs);
    let secs = (end.0 - start.0).as_secs_f64();
    (secs, end.1.iter().zip(&start.1).map(|(e, s)| (e - s) as f64 / secs).collect())
}

/// The local hour (as the agent's schedules read the clock).
fn local_hour() -> u32 {
    let out = std::process::Command::new("date").arg("+%H").output().expect("date");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("an hour")
}

// ---------------------------------------------------------------------------------------------
// 1. Include and exclude rules

/// `--exclude` rules in gitignore syntax (a directory rule, a glob, a root-anchored name, a
/// negation) and an `--include`: excluded names never reach the replica, selected ones do,
/// also when created or renamed while the job runs (a rename into an excluded name removes it
/// from the replica; out of one brings it in).
fn exclude_and_include_flags_keep_unselected_names_off_the_replica(watch: Watch) {
    let dir = tempfile::tempdir().unwrap();
    let (src, replica, home) = (dir.path().join("src"), dir.path().join("replica"), dir.path().join("home"));
    Tree::at(&src)
        .file("keep/a.txt", b"a")
        .file("keep/b.log", b"b log")
        .file("keep/keep.log", b"kept despite *.log")
        .file("cache/big", &noise(1, 100_000))
        .file("sub/cache/also", b"cache/ matches at any depth")
        .file("x.tmp", b"tmp")
        .file("build/out", b"root build")
        .file("sub/build/out", b"not the root build")
        .file("notes.md", b"# notes")
        .file("skip.md", b"no .txt, .md or .log: not included");
    // Directories are kept as containers unless excluded; files must also match an include.
    let keep = |p: &str, is_dir: bool| -> bool {
        let name = p.rsplit('/').next().unwrap();
        let excluded = p.split('/').any(|c| c == "cache")
            || name.ends_with(".tmp")
            || p == "build"
            || p.starts_with("build/")
            || (name.ends_with(".log") && name != "keep.log")
            || name == "skip.md";
        let included = is_dir
            || [".txt", ".log", ".md"].iter().any(|e| name.ends_with(e))
            || p.starts_with("sub/build/");
        !excluded && included
    };
    let mut args = vec!["protect", src.to_str().unwrap(), "--to", replica.to_str().unwrap()];
    for r in ["cache/", "*.tmp", "/build", "*.log", "!keep.log", "skip.md"] {
        args.extend(["--exclude", r]);
    }
    for r in ["*.txt", "*.log", "*.md", "sub/build/"] {
        args.extend(["--include", r]);
    }
    args.extend(watch.args());
    let mut agent = Proc::start(&home, "agent", &args);
    wait_selected(&src, &replica, &keep, &mut agent);
    assert!(replica.join("keep/keep.log").exists() && replica.join("sub/build/out").exists());
    assert!(
        !replica.join("cache").exists() && !replica.join("x.tmp").exists() && !replica.join("build").exists()
    );

    // While running: new names of every kind, and renames across the selection boundary.
    Tree::at(&src)
        .file("cache/new", b"new in an excluded directory")
        .file("later/cache/deep", b"excluded at depth")
        .file("later/c.txt", b"selected, in a new directory")
        .file("later/d.tmp", b"excluded glob")
        .file("later/e.bin", b"not included")
        .file("build/more", b"excluded root build")
        .file("sub/build/more", b"included directory")
        .file("later/err.log", b"excluded log")
        .file("later/keep.log", b"negated exclude");
    std::fs::rename(src.join("keep/a.txt"), src.join("keep/a.tmp")).unwrap();
    std::fs::rename(src.join("x.tmp"), src.join("x.txt")).unwrap();
    std::fs::rename(src.join("notes.md"), src.join("cache/notes.md")).unwrap();
    wait_selected(&src, &replica, &keep, &mut agent);
    for gone in [
        "keep/a.txt",
        "keep/a.tmp",
        "notes.md",
        "cache",
        "later/cache",
        "later/d.tmp",
        "later/err.log",
        "later/e.bin",
    ] {
        assert!(!replica.join(gone).exists(), "{gone} reached the replica");
    }
    assert_eq!(std::fs::read(replica.join("x.txt")).unwrap(), b"tmp");
    assert_eq!(std::fs::read(replica.join("later/keep.log")).unwrap(), b"negated exclude");
    assert!(agent.stop().success(), "{}", agent.log());
}

/// Exclude rules and whole directories: a directory renamed out of an excluded name brings
/// its contents to the replica, one renamed into an excluded name leaves it, and names
/// created or renamed while the agent was stopped (cleanly, then killed) follow the rules
/// when it starts again.
fn exclude_rules_hold_across_directory_renames_and_restarts(watch: Watch) {
    let dir = tempfile::tempdir().unwrap();
    let (src, replica, home) = (dir.path().join("src"), dir.path().join("replica"), dir.path().join("home"));
    Tree::at(&src)
        .file("cache/one", b"1")
        .file("cache/sub/two", &noise(5, 80_000))
        .file("data/three", b"3")
        .file("data/deep/four", &noise(6, 70_000))
        .file("data/x.tmp", b"tmp");
    let keep = |p: &str, _: bool| !p.split('/').any(|c| c == "cache") && !p.ends_with(".tmp");
    let mut args = vec!["protect", src.to_str().unwrap(), "--to", replica.to_str().unwrap()];
    args.extend(["--exclude", "cache/", "--exclude", "*.tmp"]);
    args.extend(watch.args());
    let mut agent = Proc::start(&home, "agent", &args);
    wait_selected(&src, &replica, &keep, &mut agent);
    std::fs::rename(src.join("cache"), src.join("was-cache")).unwrap();
    std::fs::rename(src.join("data"), src.join("cache")).unwrap();
    wait_selected(&src, &replica, &keep, &mut agent);
    assert!(replica.join("was-cache/sub/two").exists() && !replica.join("data").exists());

    // Changes while stopped cleanly.
    assert!(agent.stop().success(), "{}", agent.log());
    std::fs::rename(src.join("cache"), src.join("data-again")).unwrap();
    std::fs::rename(src.join("was-cache"), src.join("cache")).unwrap();
    Tree::at(&src).file("cache/new", b"n").file("fresh.tmp", b"t").file("fresh", b"f");
    let mut agent = Proc::start(&home, "agent", &args);
    wait_selected(&src, &replica, &keep, &mut agent);
    assert!(replica.join("data-again/deep/four").exists() && !replica.join("was-cache").exists());

    // Changes after a crash (to names the index saved at the clean stop knows: see the
    // report of the names created after the last index checkpoint).
    agent.kill();
    std::fs::rename(src.join("cache"), src.join("out")).unwrap();
    Tree::at(&src).file("more.tmp", b"t").file("out/more.tmp", b"t");
    let mut agent = Proc::start(&home, "agent", &args);
    wait_selected(&src, &replica, &keep, &mut agent);
    assert!(replica.join("out/sub/two").exists() && replica.join("out/new").exists());
    assert!(agent.stop().success(), "{}", agent.log());
}

/// The same rules from a `[[job]]` section (`include = ["*.db", "images/"]`, `exclude =
/// ["*.tmp"]`), run by plain `doppel --config FILE protect`: only database files and the
/// images directory reach the replica, excludes win over includes, and new files follow the
/// rules too.
fn include_and_exclude_rules_of_a_config_job_apply(watch: Watch) {
    let dir = tempfile::tempdir().unwrap();
    let (src, replica, home) = (dir.path().join("src"), dir.path().join("replica"), dir.path().join("home"));
    Tree::at(&src)
        .file("data/x.db", &noise(2, 70_000))
        .file("data/y.txt", b"not included")
        .file("images/a.raw", &noise(3, 200_000))
        .file("images/b.tmp", b"excluded wins over the included directory")
        .file("top.txt", b"not included");
    let config = write_config(
        &dir.path().join("doppel.toml"),
        &format!(
            "[[job]]\nname = \"j\"\npath = \"{}\"\nto = \"{}\"\ninclude = [\"*.db\", \"images/\"]\nexclude = [\"*.tmp\"]\ncapture = \"{}\"\n",
            src.display(),
            replica.display(),
            capture_name(watch)
        ),
    );
    let keep = |p: &str, is_dir: bool| {
        is_dir || ((p.ends_with(".db") || p.starts_with("images/")) && !p.ends_with(".tmp"))
    };
    let mut agent = Proc::start(&home, "agent", &["--config", &config, "protect"]);
    wait_selected(&src, &replica, &keep, &mut agent);
    assert!(replica.join("data/x.db").exists() && replica.join("images/a.raw").exists());
    Tree::at(&src)
        .file("data/new.db", b"new db")
        .file("data/new.txt", b"new text")
        .file("images/sub/c.qcow2", &noise(4, 90_000))
        .file("images/c.tmp", b"tmp")
        .file("elsewhere/z.db", b"a db anywhere");
    let f = std::fs::OpenOptions::new().write(true).open(src.join("data/x.db")).unwrap();
    f.write_all_at(b"changed", 1000).unwrap();
    drop(f);
    wait_selected(&src, &replica, &keep, &mut agent);
    assert!(replica.join("elsewhere/z.db").exists() && !replica.join("data/new.txt").exists());
    assert!(agent.stop().success(), "{}", agent.log());
}

// ---------------------------------------------------------------------------------------------
// 2. Every [[job]] of the config

/// `doppel protect` without a directory runs every `[[job]]`: two jobs to one remote target
/// (identity from `[pins]`) and one to a local directory, in one process; each converges to
/// its own destination, keeps replicating, and status lists all three.
#[test]
fn plain_protect_runs_every_job_of_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("source-home");
    let sid = init(&home);
    let target = start_target(dir.path(), &[("web1", &sid)], 0);
    let srcs: Vec<PathBuf> = ["www", "db", "etc"].iter().map(|n| dir.path().join("srcs").join(n)).collect();
    for (i, s) in srcs.iter().enumerate() {
        Tree::at(s)
            .file("common.txt", format!("tree {i}").as_bytes())
            .file(&format!("only-{i}/f"), &noise(i as u64, 30_000));
    }
    let local = dir.path().join("local-replica");
    let config = write_config(
        &dir.path().join("doppel.toml"),
        &format!(
            "[pins]\n\"{addr}\" = \"{tid}\"\n\n\
             [[job]]\nname = \"www\"\npath = \"{}\"\nto = \"{addr}\"\n\n\
             [[job]]\nname = \"db\"\npath = \"{}\"\nto = \"{addr}\"\n\n\
             [[job]]\nname = \"etc\"\npath = \"{}\"\nto = \"{}\"\n",
            srcs[0].display(),
            srcs[1].display(),
            srcs[2].display(),
            local.display(),
            addr = target.addr,
            tid = target.id,
        ),
    );
    let mut agent = Proc::start(&home, "agent", &["--config", &config, "protect"]);
    let replicas =
        [target.data.join("replicas/web1/www"), target.data.join("replicas/web1/db"), local.clone()];
    for (s, r) in srcs.iter().zip(&replicas) {
        wait_converged(s, r, Duration::from_secs(60), &mut agent);
    }
    let jobs = all_jobs(&home);
    assert_eq!(jobs.keys().cloned().collect::<Vec<_>>(), ["db", "etc", "www"], "{jobs:?}");
    for j in jobs.values() {
        assert_eq!(j["state"], "replicating", "{j}");
    }
    for (i, s) in srcs.iter().enumerate() {
        Tree::at(s).file("common.txt", format!("tree {i}, changed").as_bytes()).file("added", b"+");
    }
    for (s, r) in srcs.iter().zip(&replicas) {
        wait_converged(s, r, Duration::from_secs(60), &mut agent);
    }
    // Each destination holds its own tree only.
    assert!(!replicas[0].join("only-1").exists() && !replicas[1].join("only-0").exists());
    assert!(local.join("only-2").exists() && !local.join("only-0").exists());
    assert!(agent.stop().success(), "{}", agent.log());
}

// ---------------------------------------------------------------------------------------------
// 3. Adaptive compression

/// `--compression auto`: 32 MiB of log text crosses the wire in far fewer bytes than its size,
/// 16 MiB of random bytes is not inflated (it travels raw), and the replica equals the source.
#[test]
fn compression_auto_shrinks_compressible_data_and_does_not_inflate_random_data() {
    let dir = tempfile::tempdir().unwrap();
    let (src, home) = (dir.path().join("src"), dir.path().join("source-home"));
    std::fs::create_dir_all(&src).unwrap();
    let sid = init(&home);
    let target = start_target(dir.path(), &[("s", &sid)], 0);
    let mut agent = target.protect(&home, "agent", &src, &["--compression", "auto", "--capture", "inotify"]);
    let replica = target.data.join("replicas/s/src");
    wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);
    wait_drained(&home, "src");

    const TEXT: usize = 32 << 20;
    let before = bytes_sent(&home, "src");
    std::fs::write(src.join("app.log"), log_text(TEXT)).unwrap();
    wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);
    wait_drained(&home, "src");
    let text_sent = bytes_sent(&home, "src") - before;
    println!("{TEXT} bytes of log text: {text_sent} bytes on the wire");
    assert!(text_sent < TEXT as u64 / 4, "log text sent in {text_sent} bytes: not compressed");
    let level = job_status(&home, "src")["compression_level"].as_u64().unwrap();
    assert!(level >= 1, "auto compression at level {level}");

    const RANDOM: u64 = 16 << 20;
    let before = bytes_sent(&home, "src");
    big_file(&src.join("random.bin"), RANDOM, 7);
    wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);
    wait_drained(&home, "src");
    let random_sent = bytes_sent(&home, "src") - before;
    println!("{RANDOM} random bytes: {random_sent} bytes on the wire");
    assert!(
        random_sent < RANDOM + RANDOM / 20,
        "random data inflated: {random_sent} bytes sent for {RANDOM}"
    );
    assert!(random_sent > RANDOM * 9 / 10, "{random_sent} bytes for {RANDOM} random bytes?");
    assert!(agent.stop().success(), "{}", agent.log());
}

/// `--compression auto` moves the level up while the link is the bottleneck: with the job held
/// to 1 MB/s, compressible data makes the level climb from its start (3) to 6 and more within
/// a few seconds; lifted with `doppel limit JOB unlimited`, the job then converges.
#[test]
fn compression_auto_raises_the_level_while_the_link_is_the_bottleneck() {
    let dir = tempfile::tempdir().unwrap();
    let (src, home) = (dir.path().join("src"), dir.path().join("source-home"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("app.log"), log_text(48 << 20)).unwrap();
    let sid = init(&home);
    let target = start_target(dir.path(), &[("s", &sid)], 0);
    let mut agent = target.protect(
        &home,
        "agent",
        &src,
        &["--compression", "auto", "--limit", "1MB", "--capture", "inotify"],
    );
    let level = wait_until(Duration::from_secs(20), "the level to climb", || {
        let s = job_status(&home, "src");
        let l = s["compression_level"].as_u64().unwrap_or(0);
        (l >= 6).then_some(l).ok_or(s.to_string())
    });
    println!("auto compression climbed to level {level} on a 1 MB/s link");
    let (st, _, err) = run(&home, &["limit", "src", "unlimited"]);
    assert!(st.success(), "{err}");
    wait_converged(&src, &target.data.join("replicas/s/src"), Duration::from_secs(60), &mut agent);
    assert!(agent.stop().success(), "{}", agent.log());
}

// ---------------------------------------------------------------------------------------------
// 4. The bandwidth shared by every job going to one target

/// `[bandwidth."HOST:PORT"]` caps everything sent to that target: two jobs without limits of
/// their own, mirroring 8 MiB of random data each at once, together stay within the shared
/// rate (both making progress); one job alone afterwards gets the whole rate, not a half.
#[test]
fn the_per_target_bandwidth_is_shared_by_its_jobs() {
    const RATE: f64 = 2e6;
    const SIZE: u64 = 8 << 20;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("source-home");
    let sid = init(&home);
    let target = start_target(dir.path(), &[("s", &sid)], 0);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    big_file(&a.join("data"), SIZE, 1);
    big_file(&b.join("data"), SIZE, 2);
    let config = write_config(
        &dir.path().join("doppel.toml"),
        &format!(
            "[pins]\n\"{addr}\" = \"{tid}\"\n\n[bandwidth.\"{addr}\"]\nrate = \"2MB\"\n\n\
             [[job]]\nname = \"a\"\npath = \"{}\"\nto = \"{addr}\"\ncapture = \"inotify\"\n\n\
             [[job]]\nname = \"b\"\npath = \"{}\"\nto = \"{addr}\"\ncapture = \"inotify\"\n",
            a.display(),
            b.display(),
            addr = target.addr,
            tid = target.id,
        ),
    );
    let mut agent = Proc::start(&home, "agent", &["--config", &config, "protect"]);
    // Once both are sending, measure three seconds of their sum.
    let start = wait_until(Duration::from_secs(30), "both jobs to send", || {
        let (t, s) = sample(&home, &["a", "b"]);
        (s[0] > 1 << 20 && s[1] > 1 << 20).then_some((t, s.clone())).ok_or(format!("{s:?}"))
    });
    let (secs, r) = rates_over(&home, &["a", "b"], &start, Duration::from_secs(3));
    let end = sample(&home, &["a", "b"]);
    let (da, db) = (r[0] * secs, r[1] * secs);
    let together = (da + db) / secs;
    println!(
        "together: {:.2} MB/s ({:.2} + {:.2}) over {secs:.2} s",
        together / 1e6,
        da / secs / 1e6,
        db / secs / 1e6
    );
    assert!(together <= 1.3 * RATE, "two jobs sent {together:.0} B/s through a shared {RATE} B/s");
    assert!(together >= 0.5 * RATE, "two jobs sent only {together:.0} B/s of a shared {RATE} B/s");
    assert!(da / secs > 0.15 * RATE && db / secs > 0.15 * RATE, "one job starved: {da} vs {db}");
    assert!(end.1[0] < SIZE && end.1[1] < SIZE, "a job finished inside the window: {end:?}");

    wait_converged(&a, &target.data.join("replicas/s/a"), Duration::from_secs(60), &mut agent);
    wait_converged(&b, &target.data.join("replicas/s/b"), Duration::from_secs(60), &mut agent);
    wait_drained(&home, "a");
    wait_drained(&home, "b");

    // Alone, one job gets the whole shared rate.
    let base = sample(&home, &["a"]).1[0];
    big_file(&a.join("more"), SIZE, 3);
    let start = wait_until(Duration::from_secs(30), "job a to send", || {
        let (t, s) = sample(&home, &["a"]);
        (s[0] > base + (1 << 20)).then_some((t, s.clone())).ok_or(format!("{s:?}"))
    });
    let (_, r) = rates_over(&home, &["a"], &start, Duration::from_millis(1500));
    let stop = sample(&home, &["a"]);
    let alone = r[0];
    println!("alone: {:.2} MB/s", alone / 1e6);
    assert!(stop.1[0] - base < SIZE, "job a finished inside the window");
    assert!(alone <= 1.3 * RATE, "one job sent {alone:.0} B/s through a shared {RATE} B/s");
    assert!(alone >= 0.6 * RATE, "alone, a job got only {alone:.0} B/s of a shared {RATE} B/s");
    assert!(agent.stop().success(), "{}", agent.log());
}

/// A `schedule` rule covering now in `[bandwidth."HOST:PORT"]` sets the shared rate (over
/// the section's `rate` and a rule for another hour, listed first).
#[test]
fn a_schedule_in_the_per_target_bandwidth_section_applies() {
    const RATE: f64 = 1e6;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("source-home");
    let sid = init(&home);
    let target = start_target(dir.path(), &[("s", &sid)], 0);
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    big_file(&src.join("data"), 4 << 20, 11);
    let h = local_hour();
    let hh = |d: u32| format!("{:02}:00", (h + d) % 24);
    let config = write_config(
        &dir.path().join("doppel.toml"),
        &format!(
            "[pins]\n\"{addr}\" = \"{tid}\"\n\n[bandwidth.\"{addr}\"]\nrate = \"20MB\"\nschedule = [\n  \
             {{ days = \"daily\", from = \"{}\", to = \"{}\", rate = \"300KB\" }},\n  \
             {{ days = \"daily\", from = \"{}\", to = \"{}\", rate = \"1MB\" }},\n]\n\n\
             [[job]]\nname = \"j\"\npath = \"{}\"\nto = \"{addr}\"\ncapture = \"inotify\"\n",
            hh(3),
            hh(4),
            hh(23),
            hh(2),
            src.display(),
            addr = target.addr,
            tid = target.id,
        ),
    );
    let mut agent = Proc::start(&home, "agent", &["--config", &config, "protect"]);
    let start = wait_until(Duration::from_secs(30), "the transfer to start", || {
        let (t, s) = sample(&home, &["j"]);
        (s[0] > 1 << 20).then_some((t, s.clone())).ok_or(format!("{s:?}"))
    });
    let rate = rates_over(&home, &["j"], &start, Duration::from_secs(2)).1[0];
    println!("shared schedule 1 MB/s: sent {:.2} MB/s", rate / 1e6);
    assert!(rate <= 1.3 * RATE, "sent {rate:.0} B/s under a shared {RATE} B/s schedule");
    assert!(rate >= 0.5 * RATE, "sent only {rate:.0} B/s under a shared {RATE} B/s schedule");
    wait_converged(&src, &target.data.join("replicas/s/j"), Duration::from_secs(60), &mut agent);
    assert!(agent.stop().success(), "{}", agent.log());
}

// ---------------------------------------------------------------------------------------------
// 5. Bandwidth schedules and `doppel limit`

/// A `bandwidth_schedule` rule covering now sets the job's rate (over its `bandwidth` and a
/// rule for another hour, listed first), and the transfer keeps to it. `doppel limit JOB RATE`
/// overrides it, the override is kept across a restart, even after a SIGKILL (as `doppel
/// limit --help` and the architecture notes say), and `doppel limit JOB schedule` goes back
/// to the schedule, which a restart keeps too.
#[test]
fn a_schedule_window_sets_the_rate_and_limit_overrides_survive_restarts_until_reset() {
    const RATE: u64 = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("source-home");
    let sid = init(&home);
    let target = start_target(dir.path(), &[("s", &sid)], 0);
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("small"), b"x").unwrap();
    let h = local_hour();
    let hh = |d: u32| format!("{:02}:00", (h + d) % 24);
    let config = write_config(
        &dir.path().join("doppel.toml"),
        &format!(
            "[pins]\n\"{addr}\" = \"{tid}\"\n\n[[job]]\nname = \"j\"\npath = \"{}\"\nto = \"{addr}\"\ncapture = \"inotify\"\n\
             bandwidth = \"20MB\"\nbandwidth_schedule = [\n  {{ days = \"daily\", from = \"{}\", to = \"{}\", rate = \"300KB\" }},\n  \
             {{ days = \"daily\", from = \"{}\", to = \"{}\", rate = \"1MB\" }},\n]\n",
            src.display(),
            hh(3),
            hh(4),
            hh(23),
            hh(2),
            addr = target.addr,
            tid = target.id,
        ),
    );
    let start_agent = || Proc::start(&home, "agent", &["--config", &config, "protect"]);
    let replica = target.data.join("replicas/s/j");
    let mut agent = start_agent();
    wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);
    assert_eq!(job_status(&home, "j")["rate_limit"], RATE);

    // The transfer keeps to the scheduled rate.
    let before = bytes_sent(&home, "j");
    big_file(&src.join("data"), 4 << 20, 5);
    let start = wait_until(Duration::from_secs(30), "the transfer to start", || {
        let (t, s) = sample(&home, &["j"]);
        (s[0] > before + (1 << 20)).then_some((t, s.clone())).ok_or(format!("{s:?}"))
    });
    let rate = rates_over(&home, &["j"], &start, Duration::from_secs(2)).1[0];
    println!("scheduled 1 MB/s: sent {:.2} MB/s", rate / 1e6);
    assert!(rate <= 1.3 * RATE as f64, "sent {rate:.0} B/s under a {RATE} B/s schedule");
    assert!(rate >= 0.5 * RATE as f64, "sent only {rate:.0} B/s under a {RATE} B/s schedule");
    wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);

    let limit = |rate: &str| {
        let (st, out, err) = run(&home, &["limit", "j", rate]);
        assert!(st.success(), "limit {rate}: {err}");
        out
    };
    limit("8MB");
    assert_eq!(job_status(&home, "j")["rate_limit"], 8_000_000);
    // Kept at once, not only at a clean stop: the agent is killed.
    agent.kill();
    let mut agent = start_agent();
    wait_until(Duration::from_secs(30), "the restarted job to answer", || {
        let s = job_status(&home, "j");
        (s["state"] == "replicating").then_some(()).ok_or(s.to_string())
    });
    assert_eq!(job_status(&home, "j")["rate_limit"], 8_000_000, "the override did not survive a restart");
    limit("unlimited");
    assert_eq!(job_status(&home, "j")["rate_limit"], 0);
    limit("schedule");
    assert_eq!(job_status(&home, "j")["rate_limit"], RATE);
    assert!(agent.stop().success(), "{}", agent.log());
    let mut agent = start_agent();
    wait_until(Duration::from_secs(30), "the restarted job to answer", || {
        let s = job_status(&home, "j");
        (s["state"] == "replicating").then_some(()).ok_or(s.to_string())
    });
    assert_eq!(job_status(&home, "j")["rate_limit"], RATE, "back on the schedule after a restart");
    let (st, _, err) = run(&home, &["limit", "j", "fast"]);
    assert!(!st.success() && err.contains("bad rate"), "{err}");
    wait_converged(&src, &replica, Duration::from_secs(30), &mut agent);
    assert!(agent.stop().success(), "{}", agent.log());
}

// ---------------------------------------------------------------------------------------------
// 6. Owners in watch mode

/// chown and chgrp of a file and of a directory (and of a symlink itself) reach the replica
/// while the job runs: owners on the replica equal the source's.
fn chown_and_chgrp_of_files_and_directories_replicate(watch: Watch) {
    if !require(rustix::process::geteuid().is_root(), "chown needs root") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, replica, home) = (dir.path().join("src"), dir.path().join("replica"), dir.path().join("home"));
    Tree::at(&src).file("f", b"file").file("d/inner", b"inner").file("g", b"group only").symlink("l", "f");
    let mut args = vec!["protect", src.to_str().unwrap(), "--to", replica.to_str().unwrap()];
    args.extend(watch.args());
    let mut agent = Proc::start(&home, "agent", &args);
    wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);
    use std::os::unix::fs::{MetadataExt, chown, lchown};
    chown(src.join("f"), Some(1234), Some(5678)).unwrap();
    chown(src.join("d"), Some(4321), Some(8765)).unwrap();
    chown(src.join("g"), None, Some(2222)).unwrap();
    lchown(src.join("l"), Some(77), Some(88)).unwrap();
    wait_converged(&src, &replica, Duration::from_secs(30), &mut agent);
    let owner = |p: &str| {
        let m = std::fs::symlink_metadata(replica.join(p)).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(owner("f"), (1234, 5678));
    assert_eq!(owner("d"), (4321, 8765));
    assert_eq!(owner("g"), (0, 2222));
    assert_eq!(owner("l"), (77, 88));
    // Back to root, the directory by group only.
    chown(src.join("f"), Some(0), Some(0)).unwrap();
    chown(src.join("d"), None, Some(0)).unwrap();
    wait_converged(&src, &replica, Duration::from_secs(30), &mut agent);
    assert_eq!((owner("f"), owner("d")), ((0, 0), (4321, 0)));
    assert!(agent.stop().success(), "{}", agent.log());
}

// ---------------------------------------------------------------------------------------------
// 9. Sync mode degrades instead of hanging, and recovers

/// `--capture fuse --sync --sync-timeout 4`: with the target frozen (SIGSTOP: the connection
/// stays open, nothing answers), an fsync returns after about the timeout instead of hanging,
/// status says `sync: degraded`, later fsyncs return at once; once the target runs again the
/// job catches up, returns to `sync: on`, and the replica equals the source. The same with
/// the target killed and restarted on its address.
#[test]
fn sync_mode_degrades_after_the_timeout_and_recovers_when_the_target_returns() {
    if !fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, home) = (dir.path().join("src"), dir.path().join("source-home"));
    Tree::at(&src).file("db", &noise(1, 100_000));
    let sid = init(&home);
    let mut target = start_target(dir.path(), &[("s", &sid)], 0);
    let mut agent = target.protect(
        &home,
        "agent",
        &src,
        &["--heartbeat", "1", "--capture", "fuse", "--sync", "--sync-timeout", "4"],
    );
    let replica = target.data.join("replicas/s/src");
    wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);
    wait_until(Duration::from_secs(30), "sync on", || {
        let s = job_status(&home, "src");
        (s["sync"] == "on" && s["state"] == "replicating").then_some(()).ok_or(s.to_string())
    });
    let write_and_sync = |off: u64, seed: u64| {
        let f = std::fs::OpenOptions::new().write(true).open(src.join("db")).unwrap();
        f.write_all_at(&noise(seed, 4096), off).unwrap();
        let t = Instant::now();
        f.sync_all().unwrap();
        t.elapsed()
    };
    // With the target answering, an fsync is quick.
    let quick = write_and_sync(0, 2);
    assert!(quick < Duration::from_secs(3), "fsync took {quick:?} with the target up");

    let pid = rustix::process::Pid::from_child(&target.proc.child);
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    let waited = write_and_sync(8192, 3);
    println!("fsync with the target frozen returned after {waited:?}");
    assert!(
        waited >= Duration::from_millis(1500),
        "fsync returned after {waited:?}: it did not wait for the target"
    );
    assert!(waited < Duration::from_secs(20), "fsync hung for {waited:?} with a 2 s sync timeout");
    let s = job_status(&home, "src");
    assert_eq!(s["sync"], "degraded", "{s}");
    assert!(agent.log().contains("SYNC REPLICATION DEGRADED"), "the log does not say so loudly");
    let degraded = write_and_sync(16384, 4);
    assert!(degraded < Duration::from_secs(3), "a degraded fsync still waited {degraded:?}");

    rustix::process::kill_process(pid, rustix::process::Signal::CONT).unwrap();
    wait_until(Duration::from_secs(60), "sync back on", || {
        let s = job_status(&home, "src");
        (s["sync"] == "on").then_some(()).ok_or(s.to_string())
    });
    assert!(agent.log().contains("sync replication restored"), "the log does not say sync is back");
    wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);
    let quick = write_and_sync(24576, 5);
    assert!(quick < Duration::from_secs(3), "fsync took {quick:?} after recovery");
    wait_converged(&src, &replica, Duration::from_secs(30), &mut agent);

    // The target gone altogether (connection refused): the same, and back once it restarts.
    target.proc.kill();
    let waited = write_and_sync(32768, 6);
    assert!(waited < Duration::from_secs(25), "fsync hung for {waited:?} with the target down");
    wait_until(Duration::from_secs(30), "sync degraded", || {
        let s = job_status(&home, "src");
        (s["sync"] == "degraded").then_some(()).ok_or(s.to_string())
    });
    let port: u16 = target.addr.rsplit_once(':').unwrap().1.parse().unwrap();
    let target = start_target(dir.path(), &[("s", &sid)], port);
    wait_until(Duration::from_secs(60), "sync back on after the target restarted", || {
        let s = job_status(&home, "src");
        (s["sync"] == "on").then_some(()).ok_or(s.to_string())
    });
    wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);
    assert!(agent.stop().success(), "{}", agent.log());
    drop(target);
}

// ---------------------------------------------------------------------------------------------
// 10. Kernel passthrough under the fuse capture

/// `--capture fuse`: the mount has kernel passthrough for read-only opens (status names it),
/// and reading a 64 MiB file through the mount costs the agent no reads of its own: the bytes
/// the agent process reads (`rchar` in /proc/PID/io) grow by far less than the file.
#[test]
fn fuse_read_only_opens_use_kernel_passthrough() {
    if !fuse_available() {
        return;
    }
    const SIZE: u64 = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let (src, replica, home) = (dir.path().join("src"), dir.path().join("replica"), dir.path().join("home"));
    std::fs::create_dir_all(&src).unwrap();
    // Written before the mount: the kernel has no page of it cached through FUSE.
    big_file(&src.join("image"), SIZE, 9);
    let mut agent = Proc::start(
        &home,
        "agent",
        &["protect", src.to_str().unwrap(), "--to", replica.to_str().unwrap(), "--capture", "fuse"],
    );
    wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);
    let st = job_status(&home, "src");
    assert!(st["capture"].as_str().unwrap_or_default().contains("passthrough reads"), "{st}");
    assert!(capture_mount_live(&src));
    let rchar = || -> u64 {
        let io = std::fs::read_to_string(format!("/proc/{}/io", agent.child.id())).unwrap();
        io.lines().find_map(|l| l.strip_prefix("rchar: ")).unwrap().trim().parse().unwrap()
    };
    let before = rchar();
    let mut total = 0u64;
    for _ in 0..2 {
        let data = std::fs::read(src.join("image")).unwrap();
        total += data.len() as u64;
    }
    assert_eq!(total, 2 * SIZE);
    let read_by_agent = rchar() - before;
    println!("reading {total} bytes through the mount: the agent read {read_by_agent} bytes");
    assert!(
        read_by_agent < SIZE / 8,
        "the agent read {read_by_agent} bytes for {total} bytes read through the mount"
    );
    // A writer still goes through the daemon: its bytes are replicated.
    let f = std::fs::OpenOptions::new().write(true).open(src.join("image")).unwrap();
    f.write_all_at(b"written after passthrough reads", 4096).unwrap();
    drop(f);
    wait_converged(&src, &replica, Duration::from_secs(30), &mut agent);
    assert!(agent.stop().success(), "{}", agent.log());
}

/// The fuse capture replicates every write through its mount and cannot leave names out, so
/// include and exclude rules with it are refused at start, naming the conflict (an earlier
/// version accepted them and replicated excluded files written through the mount), from
/// flags and from a config `[[job]]` alike, before anything is mounted or sent.
#[test]
fn include_and_exclude_rules_are_refused_with_the_fuse_capture() {
    let dir = tempfile::tempdir().unwrap();
    let (src, replica, home) = (dir.path().join("src"), dir.path().join("replica"), dir.path().join("home"));
    Tree::at(&src).file("a.txt", b"a").file("x.tmp", b"x");
    let refused = |args: &[&str]| {
        let (st, out, err) = run(&home, args);
        assert!(!st.success(), "fuse capture with rules accepted: {out}{err}");
        assert!(err.starts_with("doppel: error:") && err.lines().count() == 1, "{err}");
        assert!(err.contains("include and exclude rules are not supported with the fuse capture"), "{err}");
        assert!(!capture_mount_live(&src) && !replica.exists());
    };
    let s = src.to_str().unwrap();
    let r = replica.to_str().unwrap();
    refused(&["protect", s, "--to", r, "--capture", "fuse", "--exclude", "*.tmp"]);
    refused(&["protect", s, "--to", r, "--capture", "fuse", "--include", "*.txt"]);
    let config = write_config(
        &dir.path().join("doppel.toml"),
        &format!(
            "[[job]]\nname = \"j\"\npath = \"{s}\"\nto = \"{r}\"\ncapture = \"fuse\"\nexclude = [\"*.tmp\"]\n"
        ),
    );
    refused(&["--config", &config, "protect"]);
}

// ---------------------------------------------------------------------------------------------
// The state directory

/// `--home` wins, then `$DOPPEL_HOME`, then the config file's `home` (the example config and
/// the config docs say `--home` and `$DOPPEL_HOME` override it; an earlier version let the
/// file's `home` override `$DOPPEL_HOME`).
#[test]
fn home_comes_from_the_flag_then_doppel_home_then_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let (flag, env, file) = (dir.path().join("flag"), dir.path().join("env"), dir.path().join("file"));
    let config = write_config(&dir.path().join("doppel.toml"), &format!("home = \"{}\"\n", file.display()));
    let id_in = |args: &[&str], env_home: Option<&Path>| {
        let mut cmd = std::process::Command::new(doppel());
        cmd.args(["--config", &config])
            .args(args)
            .arg("init")
            .env_remove("DOPPEL_CONFIG")
            .env_remove("DOPPEL_HOME");
        if let Some(h) = env_home {
            cmd.env("DOPPEL_HOME", h);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let id = |home: &Path| std::fs::read_dir(home.join("identity")).is_ok();
    let a = id_in(&["--home", flag.to_str().unwrap()], Some(&env));
    assert!(id(&flag) && !id(&env) && !id(&file), "--home first");
    let b = id_in(&[], Some(&env));
    assert!(id(&env) && !id(&file), "$DOPPEL_HOME before the config file's home");
    let c = id_in(&[], None);
    assert!(id(&file), "the config file's home without --home and $DOPPEL_HOME");
    assert!(a != b && b != c && a != c, "three homes, three identities");
}

// ---------------------------------------------------------------------------------------------
// Dead links

/// "A link that goes down is noticed within three heartbeats": with `--heartbeat 1` and the
/// target frozen (SIGSTOP: the TCP connection stays open, nothing answers), the agent says
/// `disconnected` within a few seconds; once the target runs again the job reconnects and
/// keeps replicating.
#[test]
fn a_silent_target_is_noticed_within_three_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let (src, home) = (dir.path().join("src"), dir.path().join("source-home"));
    Tree::at(&src).file("a", b"a");
    let sid = init(&home);
    let target = start_target(dir.path(), &[("s", &sid)], 0);
    let mut agent = target.protect(&home, "agent", &src, &["--heartbeat", "1", "--capture", "inotify"]);
    let replica = target.data.join("replicas/s/src");
    wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);
    let pid = rustix::process::Pid::from_child(&target.proc.child);
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    let frozen = Instant::now();
    wait_until(Duration::from_secs(15), "the agent to notice the silent target", || {
        let s = job_status(&home, "src");
        (s["state"] == "disconnected" && s["connected"] == false).then_some(()).ok_or(s.to_string())
    });
    let noticed = frozen.elapsed();
    println!("silent target noticed after {noticed:?} (heartbeat 1 s)");
    assert!(
        noticed >= Duration::from_millis(1500),
        "noticed after {noticed:?}: before any heartbeat was missed?"
    );
    assert!(noticed < Duration::from_secs(8), "noticed after {noticed:?} with a 1 s heartbeat");
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).unwrap();
    Tree::at(&src).file("b", b"after the silence");
    wait_converged(&src, &replica, Duration::from_secs(60), &mut agent);
    assert_eq!(job_status(&home, "src")["state"], "replicating");
    assert!(agent.stop().success(), "{}", agent.log());
}

/// One target per home and per data directory; a target that cannot listen changes nothing.
#[test]
fn a_second_target_on_a_home_or_data_directory_in_use_is_refused_and_a_failed_start_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let target = start_target(dir.path(), &[], 0);
    let home = target.proc.home.clone();
    let note = std::fs::read(home.join("target-data")).unwrap();
    let other_data = dir.path().join("other-data");
    let start = |home: &Path, listen: &str, data: &Path| {
        let mut p =
            Proc::start(home, "second", &["target", "--listen", listen, "--data", data.to_str().unwrap()]);
        let st = p.wait(Duration::from_secs(30));
        (st, p.log())
    };
    // The port the first one holds: refused before anything is made or noted.
    let (st, log) = start(&home, &target.addr, &other_data);
    assert!(!st.success() && log.contains("cannot listen on"), "{log}");
    assert!(!other_data.exists(), "a target that could not listen made its data directory");
    assert_eq!(std::fs::read(home.join("target-data")).unwrap(), note, "the failed start rewrote the note");
    // Same home, another port.
    let (st, log) = start(&home, "127.0.0.1:0", &other_data);
    assert!(!st.success() && log.contains("a target already runs with home"), "{log}");
    // Another home, the same data directory.
    let (st, log) = start(&dir.path().join("home2"), "127.0.0.1:0", &target.data);
    assert!(!st.success() && log.contains("is in use by a target running now"), "{log}");
    assert_eq!(std::fs::read(home.join("target-data")).unwrap(), note);
    // The DR side with its target down: status says so and names the replicas still there,
    // rather than "no jobs or replicas".
    let (_, out, _) = run(&home, &["status"]);
    assert!(!out.contains("TARGET: not running"), "the target runs: {out}");
    std::fs::create_dir_all(target.data.join("replicas/web1/www")).unwrap();
    let mut target = target;
    assert!(target.proc.stop().success(), "{}", target.proc.log());
    let (st, out, err) = run(&home, &["status"]);
    assert!(st.success(), "{err}");
    assert!(out.contains("TARGET: not running") && out.contains("replicas web1/www"), "{out}");
}
