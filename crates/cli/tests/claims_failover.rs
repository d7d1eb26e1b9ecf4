//! Failover claims of the README and the architecture notes, end to end through the target's
//! config file and the real binary: `doppel events --source/--last`, `pre_failover` scripts
//! (once, with their environment, a failing one stopping the run before the workload), and
//! command, TCP and HTTP probes deciding whether a silent source has failed.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// `doppel events ARGS --json` on the target.
fn events(target_home: &Path, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["events"];
    a.extend_from_slice(args);
    a.push("--json");
    let (st, out, err) = run(target_home, &a);
    assert!(st.success(), "events {args:?} failed: {err}");
    out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// `doppel protect SRC --to TARGET --name JOB` for source home `home`.
fn agent(home: &Path, src: &Path, target: &TargetProc, job: &str) -> Proc {
    target.protect(
        home,
        &format!("agent-{job}"),
        src,
        &["--name", job, "--heartbeat", "1", "--capture", "inotify"],
    )
}

/// A source directory with a small tree.
fn small_tree(dir: &Path, name: &str) -> PathBuf {
    let src = dir.join(name);
    Tree::at(&src).file("a.txt", name.as_bytes()).file("d/b", &noise(1, 20_000));
    src
}

// ---------------------------------------------------------------------------------------------
// `doppel events --source S --last N`

/// Two sources failed over (one twice, interleaved): `--source S` keeps exactly that
/// source's events in log order, `--last N` the last N of the whole log, both together the
/// last N of that source's; the text form follows the same filters.
#[test]
fn events_filter_by_source_and_keep_the_last_n() {
    let dir = tempfile::tempdir().unwrap();
    let (h1, h2) = (dir.path().join("home1"), dir.path().join("home2"));
    let (id1, id2) = (init(&h1), init(&h2));
    let config = format!(
        "[[target.allow]]\nname = \"s1\"\nid = \"{id1}\"\n\n[[target.allow]]\nname = \"s2\"\nid = \"{id2}\"\n"
    );
    let target = start_target_config(dir.path(), &config, "127.0.0.1:0", &dir.path().join("data"), None);
    let th = dir.path().join("target-home");
    let (src1, src2) = (small_tree(dir.path(), "one"), small_tree(dir.path(), "two"));
    let mut a1 = agent(&h1, &src1, &target, "j");
    let mut a2 = agent(&h2, &src2, &target, "j");
    wait_converged(&src1, &target.data.join("replicas/s1/j"), Duration::from_secs(60), &mut a1);
    wait_converged(&src2, &target.data.join("replicas/s2/j"), Duration::from_secs(60), &mut a2);
    for s in ["s1", "s2", "s1"] {
        let (st, out, err) = run(&th, &["failover", s]);
        assert!(st.success(), "failover {s}: {out}{err}");
    }
    let all = events(&th, &[]);
    let of = |s: &str| all.iter().filter(|e| e["source"] == s).cloned().collect::<Vec<_>>();
    let (e1, e2) = (of("s1"), of("s2"));
    assert!(e1.len() >= 4 && e2.len() >= 2, "{all:?}");
    assert_eq!(e1.len() + e2.len(), all.len(), "events of no source: {all:?}");
    // The log is in time order, and s1's second run comes after s2's.
    let times: Vec<u64> = all.iter().map(|e| e["time_us"].as_u64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert_eq!(all.last().unwrap()["source"], "s1");

    assert_eq!(events(&th, &["--source", "s1"]), e1);
    assert_eq!(events(&th, &["--source", "s2"]), e2);
    assert_eq!(events(&th, &["--last", "3"]), all[all.len() - 3..].to_vec());
    assert_eq!(events(&th, &["--source", "s2", "--last", "2"]), e2[e2.len() - 2..].to_vec());
    assert_eq!(events(&th, &["--last", "1000"]), all);
    assert!(events(&th, &["--last", "0"]).is_empty());
    assert!(events(&th, &["--source", "nobody"]).is_empty());
    // Text: one line per event, the same selection.
    let (st, out, _) = run(&th, &["events", "--source", "s2"]);
    assert!(st.success());
    assert_eq!(out.lines().count(), e2.len(), "{out}");
    assert!(out.lines().all(|l| l.contains(" s2 ") && !l.contains(" s1 ")), "{out}");
    let (st, out, _) = run(&th, &["events", "--last", "2"]);
    assert!(st.success());
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(out.lines().last().unwrap().contains("failover-done"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// pre_failover scripts

/// `pre_failover` scripts run once per failover (not per job), after the fence and before
/// the per-job `failover` scripts, with `DOPPEL_SOURCE`, `DOPPEL_STEP`, `DOPPEL_JOBS` and
/// `DOPPEL_DATA` in their environment and no job of their own. A failing one stops the run
/// with its output and exit status before any workload starts; run again, the failover
/// continues: the fence is not redone, the pre-failover script runs again (it never
/// succeeded), then the workload starts once per job.
#[test]
fn pre_failover_scripts_run_once_with_their_environment_and_a_failing_one_stops_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("source-home");
    let sid = init(&home);
    let (log, ok) = (dir.path().join("order.log"), dir.path().join("quorum-ok"));
    let pre = script(
        &dir.path().join("pre.sh"),
        &format!(
            "echo \"pre source=$DOPPEL_SOURCE step=$DOPPEL_STEP jobs=$DOPPEL_JOBS data=$DOPPEL_DATA job=${{DOPPEL_JOB-none}} epoch=$(cat $DOPPEL_DATA/state/s/www/checkpoint.json | tr -d ' \\n' | sed 's/.*\"epoch\":\\([0-9]*\\).*/\\1/')\" >> {log}\n\
             if [ ! -e {ok} ]; then echo 'no quorum: the other site still sees web1' >&2; exit 3; fi",
            log = log.display(),
            ok = ok.display()
        ),
    );
    let start = script(
        &dir.path().join("start.sh"),
        &format!("echo \"failover job=$DOPPEL_JOB step=$DOPPEL_STEP\" >> {}", log.display()),
    );
    let config = format!(
        "[[target.allow]]\nname = \"s\"\nid = \"{sid}\"\npre_failover = [\"{pre}\"]\nfailover = [\"{start}\"]\n"
    );
    let data = dir.path().join("data");
    let target = start_target_config(dir.path(), &config, "127.0.0.1:0", &data, None);
    let th = dir.path().join("target-home");
    let (www, db) = (small_tree(dir.path(), "www"), small_tree(dir.path(), "db"));
    let mut a1 = agent(&home, &www, &target, "www");
    let mut a2 = agent(&home, &db, &target, "db");
    wait_converged(&www, &target.data.join("replicas/s/www"), Duration::from_secs(60), &mut a1);
    wait_converged(&db, &target.data.join("replicas/s/db"), Duration::from_secs(60), &mut a2);
    a1.kill();
    a2.kill();

    let (st, out, err) = run(&th, &["failover", "s"]);
    assert!(!st.success(), "the failover succeeded with a failing pre-failover script: {out}");
    assert!(err.contains("no quorum: the other site still sees web1"), "{err}");
    assert!(err.contains("exit status: 3"), "{err}");
    let text = std::fs::read_to_string(&log).unwrap();
    let data = std::fs::canonicalize(&data).unwrap_or(data);
    let want_pre =
        format!("pre source=s step=pre-failover jobs=db www data={} job=none epoch=2", data.display());
    assert_eq!(text.lines().collect::<Vec<_>>(), [want_pre.as_str()], "no workload may start: {text}");
    let failed = events(&th, &[]).into_iter().find(|e| e["status"] == "failed").expect("a failed step event");
    assert_eq!(failed["step"], "pre-failover", "{failed}");
    let s = source_status(&th, "s");
    assert!(s["error"].as_str().unwrap_or_default().contains("no quorum"), "{s}");

    std::fs::write(&ok, b"").unwrap();
    let (st, out, err) = run(&th, &["failover", "s", "--json"]);
    assert!(st.success(), "{out}{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let steps: Vec<String> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("{} {}", s["step"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        ["fence skipped", "fence skipped", "pre-failover done", "failover done", "failover done"],
        "{report}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            want_pre.as_str(),
            want_pre.as_str(),
            "failover job=db step=failover",
            "failover job=www step=failover"
        ],
        "{text}"
    );
    let s = source_status(&th, "s");
    assert!(s["error"].is_null(), "{s}");
}

// ---------------------------------------------------------------------------------------------
// Probes

/// An HTTP server on 127.0.0.1 answering every request with the status in `code`.
struct Health {
    port: u16,
    code: Arc<AtomicU16>,
    stop: Arc<AtomicBool>,
}

impl Health {
    fn start(code: u16) -> Health {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let code = Arc::new(AtomicU16::new(code));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (code.clone(), stop.clone());
        // Blocks in accept; dropping the server wakes it with a connection of its own.
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 2048];
                let _ = conn.read(&mut buf);
                let code = c.load(Ordering::Relaxed);
                let _ = conn.write_all(
                    format!("HTTP/1.1 {code} X\r\nLocation: /elsewhere\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                );
            }
        });
        Health { port, code, stop }
    }
}

impl Drop for Health {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Waits until the target has heard nothing from source `s` for `secs` seconds; returns its
/// status then.
fn silent_for(th: &Path, secs: f64) -> Value {
    wait_until(Duration::from_secs(60), "the source to stay silent", || {
        let st = source_status(th, "s");
        (st["silent_secs"].as_f64().unwrap_or(0.0) > secs).then_some(st.clone()).ok_or(st.to_string())
    })
}

/// With `policy = "auto"`, a crashed source whose command, TCP and HTTP probes (the server
/// answering a redirect: 3xx counts as alive) still answer is not failed over however long
/// the link is silent; nor while fewer probes, down to one, answer; once the HTTP probe
/// answers 500 too, every check agrees and the target fails the source over by itself.
#[test]
fn probes_keep_a_silent_source_from_failing_over_until_every_one_fails() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("source-home");
    let sid = init(&home);
    let flag = dir.path().join("service-up");
    std::fs::write(&flag, b"").unwrap();
    let health = Health::start(302);
    let ssh = TcpListener::bind("127.0.0.1:0").unwrap();
    let config = format!(
        "[[target.allow]]\nname = \"s\"\nid = \"{sid}\"\npolicy = \"auto\"\ninterval_secs = 1\nmissed = 2\n\
         probes = [\"cmd:test -e {}\", \"tcp:{}\", \"http://127.0.0.1:{}/health\"]\n",
        flag.display(),
        ssh.local_addr().unwrap(),
        health.port
    );
    let target = start_target_config(dir.path(), &config, "127.0.0.1:0", &dir.path().join("data"), None);
    let th = dir.path().join("target-home");
    let src = small_tree(dir.path(), "src");
    let mut a = agent(&home, &src, &target, "j");
    wait_converged(&src, &target.data.join("replicas/s/j"), Duration::from_secs(60), &mut a);
    a.kill();
    let no_failover = |st: &Value| {
        assert_ne!(st["state"], "failed", "{st}");
        assert!(st["failover_in_secs"].is_null(), "a countdown while a probe answers: {st}");
        assert!(events(&th, &[]).iter().all(|e| e["kind"] != "failover-started"), "failed over: {st}");
    };
    // Both probes answer: twice the threshold of silence, no failover.
    no_failover(&silent_for(&th, 4.5));
    // The command probe fails, the others still answer.
    std::fs::remove_file(&flag).unwrap();
    let s = source_status(&th, "s")["silent_secs"].as_f64().unwrap();
    no_failover(&silent_for(&th, s + 4.5));
    // The TCP port closes too (connections refused): the HTTP probe alone still answers.
    drop(ssh);
    let s = source_status(&th, "s")["silent_secs"].as_f64().unwrap();
    no_failover(&silent_for(&th, s + 4.5));
    // The HTTP probe answers 500: everything agrees the source is gone.
    health.code.store(500, Ordering::Relaxed);
    wait_until(Duration::from_secs(30), "the automatic failover", || {
        events(&th, &[])
            .into_iter()
            .find(|e| e["kind"] == "failover-done")
            .ok_or_else(|| source_status(&th, "s").to_string())
    });
    let st = source_status(&th, "s");
    assert_eq!(st["jobs"][0]["epoch"], 2, "{st}");
}

// ---------------------------------------------------------------------------------------------
// `doppel failover SOURCE --job JOB`

/// `--job` limits a failover to the named jobs: only that job is fenced (its agent is refused
/// and stops, saying `fenced`) and has its workload started (`DOPPEL_JOBS` names it alone),
/// while the source's other job keeps replicating to its replica.
#[test]
fn failover_of_one_job_leaves_the_sources_other_jobs_replicating() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("source-home");
    let sid = init(&home);
    let log = dir.path().join("started");
    let start = script(
        &dir.path().join("start.sh"),
        &format!("echo \"$DOPPEL_JOB jobs=$DOPPEL_JOBS epoch=$DOPPEL_EPOCH\" >> {}", log.display()),
    );
    let config = format!("[[target.allow]]\nname = \"s\"\nid = \"{sid}\"\nfailover = [\"{start}\"]\n");
    let target = start_target_config(dir.path(), &config, "127.0.0.1:0", &dir.path().join("data"), None);
    let th = dir.path().join("target-home");
    let (www, db) = (small_tree(dir.path(), "www"), small_tree(dir.path(), "db"));
    let mut a1 = agent(&home, &www, &target, "www");
    let mut a2 = agent(&home, &db, &target, "db");
    let (r1, r2) = (target.data.join("replicas/s/www"), target.data.join("replicas/s/db"));
    wait_converged(&www, &r1, Duration::from_secs(60), &mut a1);
    wait_converged(&db, &r2, Duration::from_secs(60), &mut a2);

    let (st, out, err) = run(&th, &["failover", "s", "--job", "www", "--json"]);
    assert!(st.success(), "{out}{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["jobs"], serde_json::json!(["www"]), "{report}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "www jobs=www epoch=2\n");
    // The fenced job's agent is refused and stops, saying so.
    let exit = a1.wait(Duration::from_secs(30));
    assert!(!exit.success(), "the fenced agent exited cleanly");
    assert_eq!(job_status(&home, "www")["state"], "fenced");
    // The other job goes on.
    assert!(a2.running(), "{}", a2.log());
    Tree::at(&db).file("after-the-failover", b"still protected");
    wait_converged(&db, &r2, Duration::from_secs(30), &mut a2);
    let s = source_status(&th, "s");
    let epochs: std::collections::BTreeMap<String, u64> = s["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["job"].as_str().unwrap().to_string(), j["epoch"].as_u64().unwrap()))
        .collect();
    assert_eq!(epochs, [("db".to_string(), 1), ("www".to_string(), 2)].into_iter().collect(), "{s}");
}
