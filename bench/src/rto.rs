//! Recovery time: from the source's death to the workload answering on the target.
//!
//! Host a runs the source: a SQLite database protected by a doppel agent (`--heartbeat 1`).
//! Host b runs the target with the `auto` policy, a service address to take over on its end
//! of the link, and a failover script that checks the replicated database (`PRAGMA
//! integrity_check` and a query, as an application opening it would) and starts the service
//! (`doppel-bench serve-file`) on the service address, answering with what the database
//! held. A client on the host asks the service address every 10 ms. At T0 the benchmark
//! pulls host a's cable and SIGKILLs the agent; the run ends when the client gets the
//! expected answer. The steps in between come from the target's event log.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use doppel_testkit::netns::NetBench;
use doppel_testkit::{Compare, compare_trees, snapshot};
use serde_json::Value;

use crate::FailoverArgs;
use crate::client::{self, Answered, ClientLink};
use crate::cpu;
use crate::remote::{self, Homes};
use crate::scratch::{Scratch, remove_if_present};

/// Port of the service.
const SERVICE_PORT: u16 = 8080;
/// The query whose answer the service gives, and the client expects.
const QUERY: &str = "PRAGMA integrity_check; SELECT count(*), max(id), sum(length(v) + length(pad)) FROM t; \
                     SELECT v FROM t ORDER BY id DESC LIMIT 1;";

/// One run, every time in microseconds since the epoch (0: not seen).
#[derive(Debug, Clone, Default)]
pub struct RtoRun {
    /// The cable pulled and the agent killed.
    pub t0: u64,
    /// The source last heard from, as the target reports it.
    pub last_heard: u64,
    /// `source-failed`.
    pub failed: u64,
    /// `failover-started`.
    pub started: u64,
    /// (step, started, done) of each failover step.
    pub steps: Vec<(String, u64, u64)>,
    /// `failover-done`.
    pub done: u64,
    /// What the client saw.
    pub client: Answered,
    /// Rows in the database.
    pub rows: u64,
    /// Directories whose mtime the replica never received before the cut (a doppel bug).
    pub stale_dirs: usize,
}

impl RtoRun {
    /// Milliseconds from T0 to `t`.
    pub fn ms(&self, t: u64) -> f64 {
        (t as f64 - self.t0 as f64) / 1000.0
    }
}

/// Runs `args.runs` failovers, each in fresh namespaces.
pub fn run(args: &FailoverArgs, scratch: &Scratch, doppel: &Path) -> Result<Vec<RtoRun>> {
    let mut out = Vec::new();
    for i in 0..args.runs {
        let r = one(args, scratch, doppel, i)?;
        eprintln!(
            "[bench] RTO run {}/{}: source failed at +{:.0} ms, failover done at +{:.0} ms, answered at +{:.0} ms",
            i + 1,
            args.runs,
            r.ms(r.failed),
            r.ms(r.done),
            r.ms(r.client.answered_us)
        );
        out.push(r);
    }
    Ok(out)
}

fn one(args: &FailoverArgs, scratch: &Scratch, doppel: &Path, i: usize) -> Result<RtoRun> {
    let work = scratch.failover(&format!("rto-{i}"));
    remove_if_present(&work)?;
    let homes = Homes::new(&work);
    let src = work.join("src");
    std::fs::create_dir_all(&src)?;
    let net = NetBench::new().map_err(|e| anyhow!("creating network namespaces: {e}"))?;
    let prefix = net.b_ip.rsplit_once('.').context("address")?.0;
    let service_ip = format!("{prefix}.100");
    let _client_link = ClientLink::new(&net, &service_ip)?;
    let bench = std::env::current_exe()?;
    let start = write_script(&work, &bench, &format!("{service_ip}:{SERVICE_PORT}"))?;
    let settings = format!(
        "policy = \"auto\"\ninterval_secs = {}\nmissed = {}\naddresses = [\"{service_ip}/24\"]\n\
         interface = \"{}\"\nfailover = [\"sh {}\"]\n",
        args.interval,
        args.missed,
        net.iface_b(),
        start.display()
    );
    let mut target = remote::start_target(doppel, &net.b, &homes, &format!("{}:7340", net.b_ip), &settings)?;
    let db = src.join("app.db");
    sqlite(
        &db,
        &format!(
            "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, pad BLOB); \
         WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {n}) \
         INSERT INTO t SELECT i, 'row ' || i, randomblob(1000) FROM c;",
            n = args.rows
        ),
    )?;
    let mut agent = remote::start_agent(doppel, &net.a, &homes, &src, &target, &["--heartbeat", "1"])?;
    agent.wait_caught_up(Duration::from_millis(50), Duration::from_secs(300))?;
    // The application is live: single-row transactions, then quiet while they replicate.
    for k in 0..50 {
        sqlite(&db, &format!("INSERT INTO t(v, pad) VALUES ('update {k}', randomblob(1000));"))?;
    }
    let replica = homes.replica();
    // Directory times are left out: each transaction creates and deletes the rollback journal
    // next to the database within the agent's debounce, which changes the directory's mtime
    // without any name for the agent to send, and doppel never replicates that mtime (see
    // "Findings" in bench/README.md). The database itself must be identical.
    remote::wait_converged(&mut agent, &src, &replica, LOOSE, Duration::from_secs(300))?;
    let stale_dirs = stale_dir_mtimes(&src, &replica);
    let expected = sqlite(&db, QUERY)?;
    if !expected.starts_with("ok\n") {
        bail!("the source database is damaged: {expected}");
    }
    if !cpu::wait_quiet(Duration::from_secs(120))? {
        eprintln!("[bench] warning: the machine stayed busy (other processes); measuring anyway");
    }
    // The agent's heartbeats and the target's checks tick every second: the cut falls at a
    // different point between two of them in each run (run i of n waits 2 + i/n seconds), so
    // the runs sample the whole range of detection times instead of one phase.
    let phase = 1000 * i as u64 / args.runs as u64;
    std::thread::sleep(Duration::from_millis(2000 + phase));

    let t0 = client::now_us();
    net.set_link(false).map_err(|e| anyhow!("pulling the cable: {e}"))?;
    agent.kill()?;
    let addr: SocketAddr = format!("{service_ip}:{SERVICE_PORT}").parse()?;
    let timeout = Duration::from_secs(args.interval * args.missed as u64 + 120);
    let answered = client::poll(addr, &expected, Duration::from_millis(10), timeout);
    let events = target.events();
    stop_service(&work);
    target.check_alive()?;
    let answered = answered.with_context(|| format!("target log:\n{}", target.log_tail(30)))?;
    let mut r = from_events(&events?, t0)?;
    r.client = answered;
    r.rows = args.rows + 50;
    r.stale_dirs = stale_dirs;
    target.stop();
    if let Err(diffs) = compare_trees(&src, &replica, LOOSE) {
        bail!("after the failover the replica differs from the source:\n{diffs}");
    }
    drop(net);
    if !args.keep {
        remove_if_present(&work)?;
    }
    Ok(r)
}

/// Compared for convergence: everything but directory modification times.
const LOOSE: Compare = Compare { ignore_dir_mtimes: true };

/// Directories that equal the source's but for their modification time.
fn stale_dir_mtimes(src: &Path, replica: &Path) -> usize {
    let (a, b) = (snapshot(src, Compare::default()), snapshot(replica, Compare::default()));
    a.iter()
        .filter(|(k, na)| {
            na.kind == "dir" && b.get(*k).is_some_and(|nb| nb.mtime_ns != na.mtime_ns && nb.mode == na.mode)
        })
        .count()
}

/// The failover script: check the database, remember its answer, start the service.
fn write_script(work: &Path, bench: &Path, listen: &str) -> Result<PathBuf> {
    let path = work.join("start-service.sh");
    let answer = work.join("answer.txt");
    std::fs::write(
        &path,
        format!(
            "set -e\n\
             sqlite3 \"$DOPPEL_REPLICA/app.db\" '{QUERY}' > {a}.tmp\n\
             head -n 1 {a}.tmp | grep -qx ok\n\
             mv {a}.tmp {a}\n\
             setsid {bench} serve-file --listen {listen} --file {a} --pidfile {pid} \
             </dev/null >>{log} 2>&1 &\n",
            a = answer.display(),
            bench = bench.display(),
            pid = work.join("service.pid").display(),
            log = work.join("service.log").display(),
        ),
    )?;
    Ok(path)
}

/// Kills the service the failover script started (by the id it wrote).
fn stop_service(work: &Path) {
    let pid = std::fs::read_to_string(work.join("service.pid")).ok().and_then(|p| p.trim().parse().ok());
    if let Some(pid) = pid.and_then(rustix::process::Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// Runs `sqlite3 DB SQL`; returns its output.
fn sqlite(db: &Path, sql: &str) -> Result<String> {
    let out = Command::new("sqlite3").arg(db).arg(sql).output().context("running sqlite3")?;
    if !out.status.success() {
        bail!("sqlite3 {} failed: {}", db.display(), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The times of the first failover after `t0` in the event log.
fn from_events(events: &[Value], t0: u64) -> Result<RtoRun> {
    let mut r = RtoRun { t0, ..Default::default() };
    let after: Vec<&Value> = events.iter().filter(|e| e["time_us"].as_u64().unwrap_or(0) >= t0).collect();
    let time = |e: &Value| e["time_us"].as_u64().unwrap_or(0);
    for e in &after {
        match (e["kind"].as_str().unwrap_or(""), e["status"].as_str()) {
            ("source-failed", _) if r.failed == 0 => r.failed = time(e),
            ("failover-started", _) if r.started == 0 => r.started = time(e),
            ("failover-step", Some("started")) => {
                r.steps.push((e["step"].as_str().unwrap_or("?").to_string(), time(e), 0));
            }
            ("failover-step", Some("done")) => {
                let step = e["step"].as_str().unwrap_or("?");
                if let Some(s) = r.steps.iter_mut().rev().find(|s| s.0 == step && s.2 == 0) {
                    s.2 = time(e);
                }
            }
            ("failover-done", _) if r.done == 0 => {
                r.done = time(e);
                // "... N ms after the source was last heard from"
                let detail = e["detail"].as_str().unwrap_or("");
                let ms = detail.split("; ").nth(1).and_then(|d| d.split(' ').next()?.parse::<u64>().ok());
                r.last_heard = ms.map_or(0, |ms| r.done.saturating_sub(ms * 1000));
            }
            _ => {}
        }
    }
    if r.failed == 0 || r.done == 0 {
        bail!("no complete automatic failover in the event log after the cut: {after:?}");
    }
    Ok(r)
}
