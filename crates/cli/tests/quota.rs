//! Per-source limits end to end: a real `doppel target` holding two sources, one with a quota.
//! Over quota (bytes, then files) the limited source pauses with `over quota` on both sides,
//! nothing is lost, the other source keeps replicating, and raising the quota (`doppel
//! reload`, then SIGHUP) resumes it until the replica equals its source. `max_jobs` refuses a
//! job past the limit until a reload raises it; an invalid file keeps the running
//! configuration.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// A source: its home, tree and running agent.
struct Source {
    name: &'static str,
    home: PathBuf,
    src: PathBuf,
    agent: Option<Proc>,
}

impl Source {
    fn new(dir: &Path, name: &'static str) -> Source {
        let home = dir.join(format!("{name}-home"));
        init(&home);
        let src = dir.join(format!("{name}-src"));
        Tree::at(&src).file("a", b"first file\n").file("d/b", &[7u8; 10_000]);
        Source { name, home, src, agent: None }
    }

    fn id(&self) -> String {
        init(&self.home)
    }

    fn start(&mut self, target: &TargetProc, job: &str) -> Proc {
        target.protect(&self.home, job, &self.src, &["--name", job])
    }

    fn replica(&self, data: &Path) -> PathBuf {
        data.join("replicas").join(self.name).join("job")
    }
}

/// The target's rows of `source` (one per job).
fn rows(target_home: &Path, source: &str) -> Vec<Value> {
    let (st, out, err) = run(target_home, &["status", "--json"]);
    assert!(st.success(), "status failed: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["replicas"].as_array().unwrap().iter().filter(|r| r["source"] == source).cloned().collect()
}

fn config(ids: &[(&str, String)], limited: &str) -> String {
    let mut c = String::from("[target]\n");
    for (name, id) in ids {
        c += &format!("[[target.allow]]\nname = \"{name}\"\nid = \"{id}\"\n");
        if *name == "small" {
            c += limited;
        }
    }
    c
}

/// Waits until the target says `source` is paused over quota, and its agent says so too.
fn wait_over_quota(th: &Path, s: &Source, what: &str) -> Value {
    let row = wait_until(Duration::from_secs(60), "the target to pause the source over quota", || {
        let r = rows(th, s.name).into_iter().next().unwrap_or(Value::Null);
        let state = r["state"].as_str().unwrap_or_default();
        (state.contains("over quota") && state.contains(what)).then(|| r.clone()).ok_or(r.to_string())
    });
    wait_until(Duration::from_secs(30), "the agent to say over quota", || {
        let j = job_status(&s.home, "job");
        let detail = j["detail"].as_str().unwrap_or_default();
        detail.contains("over quota").then_some(()).ok_or(j.to_string())
    });
    row
}

fn reload(th: &Path) -> String {
    let (st, out, err) = run(th, &["reload"]);
    assert!(st.success(), "reload failed: {out}{err}");
    out
}

#[test]
fn over_quota_pauses_one_source_others_go_on_and_raising_the_quota_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut small = Source::new(dir.path(), "small");
    let mut other = Source::new(dir.path(), "other");
    let ids = [("small", small.id()), ("other", other.id())];
    let data = dir.path().join("target-data");
    let target = start_target_config(
        dir.path(),
        &config(&ids, "quota_bytes = \"4MiB\"\n"),
        "127.0.0.1:0",
        &data,
        None,
    );
    let th = target.proc.home.clone();
    let conf = dir.path().join("target.toml");
    small.agent = Some(small.start(&target, "job"));
    other.agent = Some(other.start(&target, "job"));
    for s in [&mut small, &mut other] {
        let replica = s.replica(&data);
        wait_converged(&s.src, &replica, Duration::from_secs(60), s.agent.as_mut().unwrap());
    }
    let q = &rows(&th, "small")[0]["quota"];
    assert_eq!(q["quota_bytes"], 4 * MIB, "{q}");
    assert!(q["used_bytes"].as_u64().is_some_and(|u| u > 0 && u < MIB), "{q}");

    // Bytes: a 6 MiB file does not fit in 4 MiB.
    big_file(&small.src.join("big"), 6 * MIB, 1);
    let row = wait_over_quota(&th, &small, "quota_bytes 4.0 MiB");
    println!("over quota (bytes): {}", row["state"]);
    let used = row["quota"]["used_bytes"].as_u64().unwrap();
    assert!(used <= 4 * MIB, "the quota held: {row}");
    // The other source is unaffected meanwhile.
    Tree::at(&other.src).file("during", b"written while small is over quota\n");
    let other_replica = other.replica(&data);
    wait_converged(&other.src, &other_replica, Duration::from_secs(60), other.agent.as_mut().unwrap());
    assert!(!rows(&th, "small")[0]["state"].as_str().unwrap().is_empty());

    // An invalid file changes nothing, and says why.
    std::fs::write(&conf, "[target]\n[[target.allow]]\nname = \"small\"\n").unwrap();
    let (st, out, err) = run(&th, &["reload"]);
    assert!(!st.success(), "an invalid config must fail the reload: {out}");
    assert!(err.contains("previous configuration stays in force") && err.contains("id"), "{err}");
    Tree::at(&other.src).file("after-bad-reload", b"still allowed\n");
    wait_converged(&other.src, &other_replica, Duration::from_secs(60), other.agent.as_mut().unwrap());

    // Raising the quota resumes the source, which converges with nothing lost.
    std::fs::write(&conf, config(&ids, "quota_bytes = \"64MiB\"\n")).unwrap();
    let out = reload(&th);
    assert!(out.contains("limits changed: small"), "{out}");
    let replica = small.replica(&data);
    wait_converged(&small.src, &replica, Duration::from_secs(60), small.agent.as_mut().unwrap());
    wait_until(Duration::from_secs(30), "the source to resume", || {
        let state = rows(&th, "small")[0]["state"].as_str().unwrap_or_default().to_string();
        (state == "replicating").then_some(()).ok_or(state)
    });

    // Files: a quota of what it has plus 3, then 10 new files; raised by SIGHUP this time.
    let files = rows(&th, "small")[0]["quota"]["used_files"].as_u64().unwrap();
    std::fs::write(&conf, config(&ids, &format!("quota_files = {}\n", files + 3))).unwrap();
    reload(&th);
    for i in 0..10 {
        Tree::at(&small.src).file(&format!("many/f{i}"), format!("{i}\n").as_bytes());
    }
    let row = wait_over_quota(&th, &small, "quota_files");
    assert_eq!(row["quota"]["used_files"].as_u64(), Some(files + 3), "{row}");
    std::fs::write(&conf, config(&ids, "quota_files = 100000\n")).unwrap();
    let pid = rustix::process::Pid::from_raw(target.proc.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    wait_converged(&small.src, &replica, Duration::from_secs(60), small.agent.as_mut().unwrap());
    for s in [&mut small, &mut other] {
        let agent = s.agent.as_mut().unwrap();
        assert!(agent.running(), "{}: {}", s.name, agent.log());
    }
    let mut target = target;
    assert!(target.proc.running(), "{}", target.proc.log());
    assert!(target.proc.log().contains("configuration reloaded"), "{}", target.proc.log());
}

#[test]
fn max_jobs_refuses_a_job_past_the_limit_until_a_reload_raises_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut small = Source::new(dir.path(), "small");
    let ids = [("small", small.id())];
    let data = dir.path().join("target-data");
    let target = start_target_config(dir.path(), &config(&ids, "max_jobs = 1\n"), "127.0.0.1:0", &data, None);
    let th = target.proc.home.clone();
    let mut first = small.start(&target, "job");
    wait_converged(&small.src, &small.replica(&data), Duration::from_secs(60), &mut first);
    let second_src = dir.path().join("second-src");
    Tree::at(&second_src).file("x", b"second job\n");
    let mut second = target.protect(&small.home, "two", &second_src, &["--name", "two"]);
    wait_until(Duration::from_secs(60), "the second job to be refused", || {
        let log = second.log();
        log.contains("max_jobs is 1").then_some(()).ok_or(log)
    });
    assert!(!data.join("replicas/small/two").exists(), "no replica made for a refused job");
    assert_eq!(rows(&th, "small").len(), 1);
    std::fs::write(dir.path().join("target.toml"), config(&ids, "max_jobs = 2\n")).unwrap();
    reload(&th);
    wait_converged(&second_src, &data.join("replicas/small/two"), Duration::from_secs(90), &mut second);
    assert!(first.running(), "{}", first.log());
}

/// The history counts against the quota: overwrites that would take it over are met by
/// dropping the oldest history (the source goes on replicating), unless `history_min`
/// protects it, when the source pauses over quota as on a full disk.
#[test]
fn history_is_charged_to_the_quota_and_trimmed_before_a_source_pauses() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = (Source::new(dir.path(), "small"), Source::new(dir.path(), "keeper"));
    for s in [&a, &b] {
        big_file(&s.src.join("disk.img"), 8 * MIB, 3);
    }
    let config = format!(
        "[target]\n\
         [[target.allow]]\nname = \"small\"\nid = \"{}\"\nquota_bytes = \"24MiB\"\nhistory_min = \"0s\"\n\
         [[target.allow]]\nname = \"keeper\"\nid = \"{}\"\nquota_bytes = \"24MiB\"\nhistory_min = \"1h\"\n",
        a.id(),
        b.id()
    );
    let data = dir.path().join("data");
    let target = start_target_config(dir.path(), &config, "127.0.0.1:0", &data, None);
    let th = target.proc.home.clone();
    for s in [&mut a, &mut b] {
        let mut agent = s.start(&target, "job");
        wait_converged(&s.src, &s.replica(&data), Duration::from_secs(60), &mut agent);
        s.agent = Some(agent);
    }
    // Four whole overwrites, each replicated before the next: 32 MiB of history for an 8 MiB
    // tree under a 24 MiB quota.
    let mut paused = false;
    for round in 0..4 {
        for s in [&a, &b] {
            big_file(&s.src.join("disk.img"), 8 * MIB, 10 + round);
        }
        wait_converged(&a.src, &a.replica(&data), Duration::from_secs(120), a.agent.as_mut().unwrap());
        wait_until(Duration::from_secs(120), "keeper to replicate the round or pause", || {
            let r = rows(&th, "keeper").remove(0);
            paused = r["state"].as_str().unwrap_or_default().contains("over quota");
            if paused {
                return Ok(());
            }
            compare_trees(&b.src, &b.replica(&data), Compare::default())
        });
    }
    assert!(paused, "keeper's protected history should have taken it over its quota");
    // Trimmed: the source converged every round, its use stays within the quota, the history
    // was cut.
    let row = rows(&th, "small").remove(0);
    let used = row["quota"]["used_bytes"].as_u64().unwrap();
    assert!(used <= 24 * MIB + MIB, "use {used} over the 24 MiB quota: {row}");
    let history = row["history"]["bytes"].as_u64().unwrap();
    assert!(history < 16 * MIB, "history {history} bytes kept over the quota: {row}");
    // Protected by history_min: paused over quota, nothing lost.
    let row = wait_over_quota(&th, &b, "bytes");
    assert!(row["history"]["bytes"].as_u64().unwrap() > 8 * MIB, "{row}");
}
