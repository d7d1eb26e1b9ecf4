//! Failover and failback end to end: real targets and agents, real scripts, real address
//! takeover in network namespaces, a real database recovered on the replica.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::sqlite::Sqlite;
use common::*;
use doppel_testkit::netns::{self, NetBench};
use serde_json::Value;

/// The target's event log (`doppel events --json`).
fn events(target_home: &Path) -> Vec<Value> {
    let (st, out, err) = run(target_home, &["events", "--json"]);
    assert!(st.success(), "events failed: {err}");
    out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The first event of `kind`, if any.
fn event(target_home: &Path, kind: &str) -> Option<Value> {
    events(target_home).into_iter().find(|e| e["kind"] == kind)
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64
}

/// A source with a small tree replicating to a target on this host whose `[[target.allow]]`
/// section for the source gets `settings`.
struct Local {
    dir: tempfile::TempDir,
    src: PathBuf,
    home: PathBuf,
    target: TargetProc,
    agent: Option<Proc>,
    /// Arguments every agent of this source gets (its capture).
    capture: &'static [&'static str],
}

impl Local {
    fn new(settings: &str, populate: impl FnOnce(&Path)) -> Local {
        Local::capturing(&[], settings, populate)
    }

    /// [`Local::new`], with the agents' capture chosen by `capture` (`--capture fuse`).
    fn capturing(capture: &'static [&'static str], settings: &str, populate: impl FnOnce(&Path)) -> Local {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        populate(&src);
        let home = dir.path().join("source-home");
        let sid = init(&home);
        let config = format!("[[target.allow]]\nname = \"s\"\nid = \"{sid}\"\n{settings}\n");
        let target = start_target_config(dir.path(), &config, "127.0.0.1:0", &dir.path().join("data"), None);
        let mut l = Local { dir, src, home, target, agent: None, capture };
        let mut agent = l.start_agent(&[]);
        wait_converged(&l.src, &l.replica(), Duration::from_secs(60), &mut agent);
        l.agent = Some(agent);
        l
    }

    fn start_agent(&self, extra: &[&str]) -> Proc {
        let mut args = vec![
            "protect",
            self.src.to_str().unwrap(),
            "--to",
            &self.target.addr,
            "--target-id",
            &self.target.id,
            "--name",
            "job",
            "--heartbeat",
            "1",
        ];
        args.extend_from_slice(self.capture);
        args.extend_from_slice(extra);
        Proc::start(&self.home, "agent", &args)
    }

    fn replica(&self) -> PathBuf {
        self.target.data.join("replicas/s/job")
    }

    fn target_home(&self) -> PathBuf {
        self.dir.path().join("target-home")
    }
}

#[test]
fn manual_policy_alerts_and_waits_for_the_operator() {
    let dir = tempfile::tempdir().unwrap();
    let notes = dir.path().join("notified");
    let notify = script(
        &dir.path().join("notify.sh"),
        &format!("echo \"$DOPPEL_EVENT $DOPPEL_SOURCE\" >> {}", notes.display()),
    );
    let mut l = Local::new(
        &format!("policy = \"manual\"\ninterval_secs = 1\nmissed = 2\nnotify = \"{notify}\""),
        |src| {
            Tree::at(src).standard();
        },
    );
    let th = l.target_home();
    assert_eq!(source_status(&th, "s")["state"], "alive");
    l.agent.as_mut().unwrap().kill();
    let killed = Instant::now();
    // While the source is silent, status counts down to the threshold.
    let countdown = wait_until(Duration::from_secs(30), "a countdown in status", || {
        let st = source_status(&th, "s");
        match (st["state"].as_str(), st["failover_in_secs"].as_f64()) {
            (Some("silent"), Some(t)) => Ok(t),
            _ => Err(st.to_string()),
        }
    });
    // At the threshold's very instant the source is still `silent`, with nothing left to count.
    assert!((0.0..=2.0).contains(&countdown), "countdown {countdown}");
    wait_until(Duration::from_secs(30), "the notify command", || {
        let text = std::fs::read_to_string(&notes).unwrap_or_default();
        text.contains("source-failed s").then_some(()).ok_or(text)
    });
    let noticed = killed.elapsed();
    let st = source_status(&th, "s");
    assert_eq!(st["state"], "failed", "{st}");
    // Well past the threshold: still nobody failed over.
    wait_until(Duration::from_secs(30), "twice the threshold", || {
        let st = source_status(&th, "s");
        (st["silent_secs"].as_f64().unwrap_or(0.0) > 4.0).then_some(()).ok_or(st.to_string())
    });
    let st = source_status(&th, "s");
    assert_eq!(st["state"], "failed", "{st}");
    assert_eq!(st["jobs"][0]["failed_over"], false, "{st}");
    assert!(event(&th, "failover-needed").is_some());
    assert!(event(&th, "failover-started").is_none(), "the manual policy failed over by itself");
    let (status, text) = {
        let (st, out, err) = run(&th, &["failover", "s"]);
        (st, format!("{out}{err}"))
    };
    assert!(status.success(), "{text}");
    assert!(text.contains("fence") && text.contains("failover of s completed"), "{text}");
    let st = source_status(&th, "s");
    assert_eq!(st["state"], "failed-over", "{st}");
    assert_eq!(st["jobs"][0]["failed_over"], true, "{st}");
    assert_eq!(st["jobs"][0]["epoch"], 2, "{st}");
    wait_until(Duration::from_secs(30), "the failover-done notification", || {
        let text = std::fs::read_to_string(&notes).unwrap_or_default();
        text.contains("failover-done s").then_some(()).ok_or(text)
    });
    println!("source failure noticed {noticed:?} after the kill (threshold 2 s)");
    assert!(noticed < Duration::from_secs(2 + 5), "noticed only after {noticed:?}");
}

#[test]
fn a_cleanly_stopped_source_is_not_failed_over_even_across_a_target_restart() {
    let mut l = Local::new("policy = \"auto\"\ninterval_secs = 1\nmissed = 2", |src| {
        Tree::at(src).standard();
    });
    let th = l.target_home();
    // Maintenance: the agent is stopped on purpose.
    assert_eq!(l.agent.as_mut().unwrap().stop().code(), Some(0));
    let waited = |th: &Path, what: &str| {
        wait_until(Duration::from_secs(30), what, || {
            let st = source_status(th, "s");
            (st["silent_secs"].as_f64().unwrap_or(0.0) > 4.0).then_some(st.clone()).ok_or(st.to_string())
        })
    };
    let st = waited(&th, "twice the threshold");
    assert_eq!(st["state"], "stopped", "{st}");
    assert!(st["failover_in_secs"].is_null(), "{st}");
    // The target restarts meanwhile: the clean stop is remembered.
    l.target.proc.kill();
    let config = std::fs::read_to_string(l.dir.path().join("target.toml")).unwrap();
    l.target = start_target_config(l.dir.path(), &config, &l.target.addr, &l.target.data, None);
    let st = waited(&th, "twice the threshold after the restart");
    assert_eq!(st["state"], "stopped", "{st}");
    assert!(event(&th, "failover-started").is_none());
    // Back, then a crash: that one fails over.
    let mut agent = l.start_agent(&[]);
    wait_until(Duration::from_secs(30), "the source to be back", || {
        let st = source_status(&th, "s");
        (st["state"] == "alive").then_some(()).ok_or(st.to_string())
    });
    agent.kill();
    wait_until(Duration::from_secs(30), "the automatic failover", || {
        event(&th, "failover-done").ok_or_else(|| source_status(&th, "s").to_string())
    });
}

#[test]
fn a_failing_failover_script_stops_the_run_and_a_rerun_completes_without_redoing_steps() {
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("count");
    let ok = dir.path().join("ok");
    let started = dir.path().join("started");
    let first = script(&dir.path().join("first.sh"), &format!("echo run >> {}", count.display()));
    let second = script(
        &dir.path().join("second.sh"),
        &format!(
            "echo \"starting VM for $DOPPEL_JOB at epoch $DOPPEL_EPOCH from $DOPPEL_REPLICA\"\n\
             if [ ! -e {ok} ]; then echo 'cannot start VM: disk image locked' >&2; exit 4; fi\n\
             echo \"$DOPPEL_SOURCE $DOPPEL_JOB $DOPPEL_EPOCH $DOPPEL_REPLICA\" > {started}",
            ok = ok.display(),
            started = started.display()
        ),
    );
    let mut l = Local::new(&format!("failover = [\"{first}\", \"{second}\"]"), |src| {
        Tree::at(src).standard();
    });
    let th = l.target_home();
    l.agent.as_mut().unwrap().kill();
    let (st, out, err) = run(&th, &["failover", "s"]);
    assert!(!st.success(), "the failover succeeded with a failing script: {out}");
    assert!(err.contains("step failover (job) failed"), "{err}");
    assert!(err.contains("cannot start VM: disk image locked") && err.contains("exit status: 4"), "{err}");
    assert!(err.contains("run the command again"), "{err}");
    let failed = events(&th)
        .into_iter()
        .find(|e| e["kind"] == "failover-step" && e["status"] == "failed")
        .expect("a failed step event");
    assert_eq!(failed["step"], "failover");
    let s = source_status(&th, "s");
    assert!(s["error"].as_str().unwrap_or_default().contains("disk image locked"), "{s}");
    assert_eq!(s["jobs"][0]["epoch"], 2, "fenced before the scripts: {s}");
    // The operator fixes the cause and runs it again.
    std::fs::write(&ok, b"").unwrap();
    let (st, out, err) = run(&th, &["failover", "s", "--json"]);
    assert!(st.success(), "{out}{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let steps: Vec<(String, String)> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["step"].as_str().unwrap().to_string(), s["status"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(
        steps,
        [("fence", "skipped"), ("failover", "skipped"), ("failover", "done")]
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .to_vec(),
        "{report}"
    );
    assert_eq!(std::fs::read_to_string(&count).unwrap(), "run\n", "the first script ran once");
    let started = std::fs::read_to_string(&started).unwrap();
    assert_eq!(started.trim(), format!("s job 2 {}", l.replica().display()));
    let s = source_status(&th, "s");
    assert_eq!(s["jobs"][0]["epoch"], 2, "the epoch moved once: {s}");
    assert!(s["error"].is_null(), "{s}");
    // Once more: everything is done already.
    let (st, out, _) = run(&th, &["failover", "s", "--json"]);
    assert!(st.success());
    let report: Value = serde_json::from_str(&out).unwrap();
    assert!(report["steps"].as_array().unwrap().iter().all(|s| s["status"] == "skipped"), "{report}");
}

#[test]
fn failback_sends_back_only_what_changed_and_protection_resumes() {
    failback_of(&[]);
}

/// The same failback of a job captured through a fuse mount: its stop keeps the block hashes
/// of the files nothing wrote since they were hashed, so its index vouches for them as a
/// watch job's does.
#[test]
fn failback_of_a_fuse_job_reads_only_what_changed() {
    failback_of(&["--capture", "fuse"]);
}

fn failback_of(capture: &'static [&'static str]) {
    const BIG: u64 = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let stopped = dir.path().join("workload-stopped");
    let stop = script(&dir.path().join("stop.sh"), &format!("echo \"$DOPPEL_JOB\" > {}", stopped.display()));
    const STILL: u64 = 16 << 20;
    let mut l = Local::capturing(capture, &format!("stop_workload = [\"{stop}\"]"), |src| {
        Tree::at(src).standard();
        big_file(&src.join("big.img"), BIG, 3);
        big_file(&src.join("still.img"), STILL, 4);
    });
    let th = l.target_home();
    // The operator fails over while the source still runs: it is fenced and stops.
    let (st, out, err) = run(&th, &["failover", "s"]);
    assert!(st.success(), "{out}{err}");
    let mut agent = l.agent.take().unwrap();
    let status = agent.wait(Duration::from_secs(60));
    assert!(!status.success(), "the fenced agent kept running");
    assert!(agent.log().contains("fenced"), "{}", agent.log());
    assert_eq!(job_status(&l.home, "job")["state"], "fenced");
    // The workload runs on the DR side and changes things; the old source changes something
    // too (split brain: the DR side's version wins).
    let replica = l.replica();
    let big = std::fs::OpenOptions::new().write(true).open(replica.join("big.img")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&big, &noise(9, 1 << 20), 10 << 20).unwrap();
    drop(big);
    std::fs::write(replica.join("dr-new.bin"), noise(10, 300_000)).unwrap();
    std::fs::remove_file(replica.join("a.txt")).unwrap();
    std::fs::write(l.src.join("dir1/b.bin"), b"written on the old source after the failover").unwrap();
    // The repaired source asks for its job back.
    let mut back = l.start_agent(&["--failback"]);
    wait_until(Duration::from_secs(120), "the source to hold the replica", || {
        assert!(back.running(), "{}", back.log());
        let s = source_status(&th, "s");
        (s["jobs"][0]["failback"]["state"] == "replicating").then_some(()).ok_or(s.to_string())
    });
    let mirrored = source_status(&th, "s")["jobs"][0]["failback"]["bytes_sent"].as_u64().unwrap();
    // Files unchanged on both sides since the failover are not read on the DR side: the
    // source's index vouched for them (its listing did not read them either). What the DR side
    // read is the big file it changed, its new file and the file the old source changed.
    let hashed = source_status(&th, "s")["jobs"][0]["failback"]["bytes_hashed"].as_u64().unwrap();
    assert!(hashed >= BIG, "the changed big file must be read ({hashed} bytes read)");
    assert!(hashed < BIG + (2 << 20), "the DR side read {hashed} bytes: unchanged files too\n{}", back.log());
    // Live changes while the failback streams.
    let mut f = std::fs::OpenOptions::new().append(true).open(replica.join("dr-new.bin")).unwrap();
    std::io::Write::write_all(&mut f, &noise(11, 100_000)).unwrap();
    drop(f);
    let cutover = Instant::now();
    let (st, out, err) = run(&th, &["failback", "s"]);
    let cutover = cutover.elapsed();
    assert!(st.success(), "{out}{err}\nSOURCE LOG:\n{}\nTARGET LOG:\n{}", back.log(), l.target.proc.log());
    for step in ["stop-workload", "final-sync", "unfence", "handover"] {
        assert!(out.contains(step), "{step} missing from the report:\n{out}");
    }
    assert_eq!(std::fs::read_to_string(&stopped).unwrap().trim(), "job");
    wait_until(Duration::from_secs(60), "protection to resume", || {
        assert!(back.running(), "{}", back.log());
        let s = job_status(&l.home, "job");
        (s["state"] == "replicating").then_some(()).ok_or(s.to_string())
    });
    compare_trees(&l.src, &replica, Compare::default()).unwrap();
    assert_eq!(
        std::fs::read(l.src.join("dir1/b.bin")).unwrap(),
        std::fs::read(replica.join("dir1/b.bin")).unwrap(),
        "the old source's own change was replaced by the replica's version"
    );
    let s = source_status(&th, "s");
    assert_eq!(s["jobs"][0]["failed_over"], false, "{s}");
    assert_eq!(s["jobs"][0]["epoch"], 3, "{s}");
    assert!(s["jobs"][0]["failback"].is_null(), "{s}");
    // Only what changed went back: 1 MiB of the big file, the new file, small bits.
    println!("failback mirror sent {mirrored} bytes for a {BIG}-byte tree; cutover took {cutover:?}");
    assert!(mirrored > 1 << 20, "the changed megabyte must go back ({mirrored} bytes)");
    assert!(mirrored < 3 << 20, "sent {mirrored} bytes: more than the changes");
    // Protection resumed without comparing the tree again, and replicates new changes.
    assert!(bytes_sent(&l.home, "job") < 1 << 20, "the resumed job re-sent the tree");
    std::fs::write(l.src.join("after-failback.txt"), b"home again").unwrap();
    wait_converged(&l.src, &replica, Duration::from_secs(60), &mut back);
    assert_eq!(back.stop().code(), Some(0), "{}", back.log());
}

/// Whether `rel` (a path beneath the job root) is selected by the rules
/// `--exclude '*.tmp' --exclude cache/`.
fn selected_by_tmp_and_cache_rules(rel: &str) -> bool {
    !rel.split('/').any(|c| c == "cache" || c.ends_with(".tmp"))
}

/// The names of `root` those rules select, described as [`snapshot`] does (directory times
/// aside: a name outside the selection moves its directory's time on one side only).
fn selected_snapshot(root: &Path) -> std::collections::BTreeMap<String, doppel_testkit::Node> {
    snapshot(root, Compare { ignore_dir_mtimes: true })
        .into_iter()
        .filter(|(k, _)| selected_by_tmp_and_cache_rules(k))
        .collect()
}

/// A failback leaves the names the job's rules exclude alone on the source: its own excluded
/// files and directories keep their bytes (the DR side never hears of them, so it neither
/// removes them nor, when its workload makes a name one of them holds, overwrites them), while
/// every selected name ends up as the DR side has it, a file the DR workload wrote under an
/// excluded name and then renamed into the selection too.
#[test]
fn a_failback_leaves_the_names_the_rules_exclude_alone_on_the_source() {
    let mut l = Local::capturing(&["--exclude", "*.tmp", "--exclude", "cache/"], "", |src| {
        Tree::at(src).standard();
    });
    // The source's own excluded names, never replicated (made after the first mirror, whose
    // wait compares whole trees).
    let own = [
        ("scratch.tmp", b"the source's own scratch file".to_vec()),
        ("dir1/sub/keep.tmp", noise(31, 70_000)),
        ("cache/blob", noise(32, 150_000)),
        ("cache/deep/more", b"beneath an excluded directory".to_vec()),
    ];
    for (rel, bytes) in &own {
        Tree::at(&l.src).file(rel, bytes);
    }
    let replica = l.replica();
    // A selected name made after them: once it is on the replica, they would be too.
    Tree::at(&l.src).file("after-the-excluded.txt", b"selected");
    wait_until(Duration::from_secs(60), "a selected name made after the excluded ones to arrive", || {
        replica.join("after-the-excluded.txt").exists().then_some(()).ok_or_else(|| "not yet".to_string())
    });
    for (rel, _) in &own {
        assert!(!replica.join(rel).exists(), "{rel} reached the replica");
    }
    let th = l.target_home();
    let (st, out, err) = run(&th, &["failover", "s"]);
    assert!(st.success(), "{out}{err}");
    let mut agent = l.agent.take().unwrap();
    assert!(!agent.wait(Duration::from_secs(60)).success(), "the fenced agent kept running");
    // The workload on the DR side changes selected names, and makes excluded names of its
    // own: one where the source keeps a file of that name.
    std::fs::write(replica.join("a.txt"), b"changed on the DR side").unwrap();
    std::fs::write(replica.join("dr-new.bin"), noise(33, 90_000)).unwrap();
    std::fs::remove_file(replica.join("empty")).unwrap();
    std::fs::write(replica.join("scratch.tmp"), b"the DR workload's scratch file").unwrap();
    std::fs::write(replica.join("dr-only.tmp"), b"made on the DR side").unwrap();
    let mut back = l.start_agent(&["--failback"]);
    wait_until(Duration::from_secs(120), "the source to hold the replica", || {
        assert!(back.running(), "{}", back.log());
        let s = source_status(&th, "s");
        (s["jobs"][0]["failback"]["state"] == "replicating").then_some(()).ok_or(s.to_string())
    });
    // While the failback streams, the DR workload writes a report under an excluded name, and
    // renames it into the selection once the stream has carried it.
    std::fs::write(replica.join("report.tmp"), noise(34, 40_000)).unwrap();
    std::fs::write(replica.join("scratch.tmp"), b"rewritten on the DR side").unwrap();
    wait_until(Duration::from_secs(60), "the DR side's report.tmp to reach the source", || {
        (std::fs::read(l.src.join("report.tmp")).ok() == Some(noise(34, 40_000)))
            .then_some(())
            .ok_or_else(|| "not yet".to_string())
    });
    std::fs::rename(replica.join("report.tmp"), replica.join("report.txt")).unwrap();
    let (st, out, err) = run(&th, &["failback", "s"]);
    assert!(st.success(), "{out}{err}\nSOURCE LOG:\n{}", back.log());
    wait_until(Duration::from_secs(60), "protection to resume", || {
        assert!(back.running(), "{}", back.log());
        let s = job_status(&l.home, "job");
        (s["state"] == "replicating").then_some(()).ok_or(s.to_string())
    });
    let touched: Vec<String> = own
        .iter()
        .filter_map(|(rel, bytes)| match std::fs::read(l.src.join(rel)) {
            Ok(got) if got == *bytes => None,
            Ok(_) => Some(format!("{rel}: overwritten")),
            Err(e) => Some(format!("{rel}: {e}")),
        })
        .collect();
    assert!(touched.is_empty(), "the failback touched excluded names: {touched:?}");
    let (want, got) = (selected_snapshot(&replica), selected_snapshot(&l.src));
    let diff = doppel_testkit::diff_snapshots(&want, &got);
    assert!(diff.is_empty(), "the selected names differ from the DR side's:\n{diff}");
    assert_eq!(std::fs::read(l.src.join("report.txt")).unwrap(), noise(34, 40_000));
    assert_eq!(back.stop().code(), Some(0), "{}", back.log());
}

#[test]
fn a_failback_survives_a_killed_source_and_a_killed_target_and_resends_little() {
    const BIG: u64 = 160 << 20;
    // 25 MB/s: the failback takes long enough to be interrupted twice.
    let mut l = Local::new("failback_limit = \"200Mbit\"", |src| {
        Tree::at(src).standard();
        big_file(&src.join("big.img"), BIG, 21);
    });
    let th = l.target_home();
    let (st, out, err) = run(&th, &["failover", "s"]);
    assert!(st.success(), "{out}{err}");
    l.agent.take().unwrap().wait(Duration::from_secs(60));
    // The source comes back with an empty disk.
    std::fs::remove_dir_all(&l.src).unwrap();
    std::fs::create_dir(&l.src).unwrap();
    let sent = |th: &Path| source_status(th, "s")["jobs"][0]["failback"]["bytes_sent"].as_u64().unwrap_or(0);
    let mut back = l.start_agent(&["--failback"]);
    wait_until(Duration::from_secs(60), "40 MiB sent back", || {
        let n = sent(&th);
        (n > 40 << 20).then_some(()).ok_or(n.to_string())
    });
    back.kill();
    let first = sent(&th);
    let mut back = l.start_agent(&["--failback"]);
    wait_until(Duration::from_secs(60), "40 MiB more", || {
        let n = sent(&th);
        (n > first + (40 << 20)).then_some(()).ok_or(n.to_string())
    });
    // What the killed target sent is read just before the kill (a few milliseconds' worth,
    // at most 1 MiB at this rate, go uncounted).
    let before_restart = sent(&th);
    l.target.proc.kill();
    // The target comes back on the same address; the source reconnects by itself.
    let config = std::fs::read_to_string(l.dir.path().join("target.toml")).unwrap();
    l.target = start_target_config(l.dir.path(), &config, &l.target.addr, &l.target.data, None);
    wait_until(Duration::from_secs(120), "the source to hold the replica", || {
        assert!(back.running(), "{}", back.log());
        let s = source_status(&th, "s");
        (s["jobs"][0]["failback"]["state"] == "replicating").then_some(()).ok_or(s.to_string())
    });
    let after_restart = sent(&th);
    let total = before_restart + after_restart;
    println!(
        "failback of {BIG} bytes sent {total} bytes across a source kill and a target kill (first {first}, before restart {before_restart}, after {after_restart})"
    );
    assert!(total < BIG + (24 << 20), "the failback started over: {total} bytes sent");
    let (st, out, err) = run(&th, &["failback", "s"]);
    assert!(st.success(), "{out}{err}\n{}", back.log());
    wait_until(Duration::from_secs(60), "protection to resume", || {
        let s = job_status(&l.home, "job");
        (s["state"] == "replicating").then_some(()).ok_or(s.to_string())
    });
    compare_trees(&l.src, &l.replica(), Compare::default()).unwrap();
}

/// Host a runs the source agent (fuse capture, sync mode) under a SQLite workload, host b the
/// target with the `auto` policy. The cable is pulled and the agent killed: the target must
/// fail over within `interval × missed + 5 s`, take over an address and start the database on
/// the replica, with every committed transaction. Then the old source comes back and is
/// fenced.
#[test]
fn automatic_failover_in_namespaces_recovers_every_commit_and_fences_the_old_source() {
    if !require(netns::available(), "network namespaces need root and iproute2") {
        return;
    }
    if !fuse_available() || !common::sqlite::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let net = NetBench::new().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let home = dir.path().join("source-home");
    let sid = init(&home);
    let tid = target_identity(dir.path());
    let vip = format!("{}.100/24", net.b_ip.rsplit_once('.').unwrap().0);
    let out = dir.path().join("started.txt");
    let start = script(
        &dir.path().join("start-db.sh"),
        &format!(
            "set -e\ntest \"$DOPPEL_SOURCE\" = s && test \"$DOPPEL_JOB\" = db && test -n \"$DOPPEL_EPOCH\"\n\
             sqlite3 \"$DOPPEL_REPLICA/app.db\" 'PRAGMA integrity_check; SELECT coalesce(max(id), 0) FROM t;' > {o}.tmp\n\
             mv {o}.tmp {o}",
            o = out.display()
        ),
    );
    let (interval, missed) = (1u64, 3u64);
    let config = format!(
        "[[target.allow]]\nname = \"s\"\nid = \"{sid}\"\npolicy = \"auto\"\ninterval_secs = {interval}\nmissed = {missed}\n\
         addresses = [\"{vip}\"]\ninterface = \"{}\"\nfailover = [\"{start}\"]\n",
        net.iface_b()
    );
    let target = start_target_config(
        dir.path(),
        &config,
        &format!("{}:7361", net.b_ip),
        &dir.path().join("data"),
        Some(&net.b),
    );
    assert_eq!(target.id, tid);
    let th = dir.path().join("target-home");
    let args = [
        "protect",
        src.to_str().unwrap(),
        "--to",
        &target.addr,
        "--target-id",
        &tid,
        "--name",
        "db",
        "--capture",
        "fuse",
        "--sync",
        "--sync-timeout",
        "2",
        "--heartbeat",
        "1",
    ];
    let mut agent = Proc::start_in(&net.a, &home, "agent", &args);
    wait_until(Duration::from_secs(60), "the job to replicate", || {
        assert!(agent.running(), "{}", agent.log());
        let s = job_status(&home, "db");
        (s["state"] == "replicating").then_some(()).ok_or(s.to_string())
    });
    // The capture mount lives in the agent's mount namespace (`ip netns exec` makes one).
    let pid = agent.child.id().to_string();
    let mut in_mount_ns = Command::new("nsenter");
    in_mount_ns.args(["-t", &pid, "-m", "sqlite3"]);
    let db = src.join("app.db");
    let mut sql = Sqlite::start_with(in_mount_ns, &db);
    assert!(sql.send(
        "PRAGMA journal_mode=wal; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, pad BLOB); SELECT 'C', 0;\n"
    ));
    wait_until(Duration::from_secs(30), "the table", || {
        sql.confirmed.lock().first().copied().ok_or("none".to_string())
    });
    let mut next = 1;
    let writing = Instant::now();
    while writing.elapsed() < Duration::from_secs(3) {
        assert!(sql.transaction(next, Duration::from_secs(20)), "transaction {next} did not commit");
        next += 1;
    }
    // The source dies: cable pulled, agent and database killed.
    net.set_link(false).unwrap();
    let cut_us = now_us();
    let committed = sql.last();
    agent.kill();
    drop(sql);
    let done = wait_until(Duration::from_secs(60), "the automatic failover", || {
        event(&th, "failover-done").ok_or_else(|| format!("{:?}", events(&th)))
    });
    let rto_ms = (done["time_us"].as_u64().unwrap().saturating_sub(cut_us)) / 1000;
    let text = std::fs::read_to_string(&out).unwrap_or_else(|e| panic!("the start script left nothing: {e}"));
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("ok"), "the database on the replica is damaged: {text}");
    let max: u64 = lines.next().unwrap().parse().unwrap();
    println!(
        "failover done {rto_ms} ms after the cut; {committed} transactions committed, {max} on the replica"
    );
    assert!(
        max >= committed,
        "transaction {committed} was committed in sync mode but the replica has only {max}"
    );
    assert!(
        rto_ms <= (interval * missed + 5) * 1000,
        "failover took {rto_ms} ms; the limit is interval x missed + 5 s"
    );
    let addrs =
        Command::new("ip").args(["-n", &net.b, "-o", "addr", "show", "dev", net.iface_b()]).output().unwrap();
    assert!(String::from_utf8_lossy(&addrs.stdout).contains(&vip), "address {vip} not taken over");
    let s = source_status(&th, "s");
    assert_eq!(s["state"], "failed-over", "{s}");
    assert_eq!(s["jobs"][0]["epoch"], 2, "{s}");
    for step in ["fence", "address", "failover"] {
        assert!(
            events(&th).iter().any(|e| e["step"] == step && e["status"] == "done"),
            "step {step} not recorded: {:?}",
            events(&th)
        );
    }

    // Split brain: the old source comes back.
    let before = snapshot(&target.data.join("replicas/s/db"), Compare::default());
    net.set_link(true).unwrap();
    let mut again = Proc::start_in(&net.a, &home, "agent-again", &args);
    let st = again.wait(Duration::from_secs(60));
    assert!(!st.success(), "the fenced agent kept running");
    assert!(again.log().contains("fenced"), "{}", again.log());
    let js = job_status(&home, "db");
    assert_eq!(js["state"], "fenced", "{js}");
    assert!(js["detail"].as_str().unwrap_or_default().contains("--failback"), "{js}");
    let r = replica_status(&th);
    assert!(r["fenced_refusals"].as_u64().unwrap_or(0) >= 1, "{r}");
    assert_eq!(r["failed_over"], true, "{r}");
    assert_eq!(
        snapshot(&target.data.join("replicas/s/db"), Compare::default()),
        before,
        "the fenced source wrote to the replica"
    );
    assert_eq!(source_status(&th, "s")["state"], "failed-over");

    // Home again: the source takes the database back, the address is released.
    let mut back_args = args.to_vec();
    back_args.push("--failback");
    let mut back = Proc::start_in(&net.a, &home, "agent-back", &back_args);
    wait_until(Duration::from_secs(60), "the source to hold the replica", || {
        assert!(back.running(), "{}", back.log());
        let s = source_status(&th, "s");
        (s["jobs"][0]["failback"]["state"] == "replicating").then_some(()).ok_or(s.to_string())
    });
    let (st, out, err) = run(&th, &["failback", "s"]);
    assert!(st.success(), "{out}{err}");
    assert!(out.contains("release-address"), "{out}");
    let addrs =
        Command::new("ip").args(["-n", &net.b, "-o", "addr", "show", "dev", net.iface_b()]).output().unwrap();
    assert!(!String::from_utf8_lossy(&addrs.stdout).contains(&vip), "address {vip} not released");
    wait_until(Duration::from_secs(60), "protection to resume", || {
        assert!(back.running(), "{}", back.log());
        let s = job_status(&home, "db");
        (s["state"] == "replicating" && s["capture"].as_str().is_some_and(|c| c.starts_with("fuse")))
            .then_some(())
            .ok_or(s.to_string())
    });
    compare_trees(&src, &target.data.join("replicas/s/db"), Compare::default()).unwrap();
    assert_eq!(back.stop().code(), Some(0), "{}", back.log());
}
