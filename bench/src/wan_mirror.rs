//! The initial mirror over the link: `rsync -az` to a daemon, lsyncd's startup sync (the
//! same rsync, driven by lsyncd) and `doppel protect` to a remote target, each from a cold
//! cache into an empty destination, alternating, each copy verified.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use crate::agent::{Agent, JobStatus};
use crate::cpu;
use crate::lsyncd::Lsyncd;
use crate::mirror::{prepare_cold, verify};
use crate::remote::{self, Homes};
use crate::rsyncd::{self, Daemon};
use crate::scratch::remove_if_present;
use crate::target::TargetProc;
use crate::tree::TreeInfo;
use crate::wan::{Env, RSYNC_PORT, Traffic, measured};

/// How often the agent's status is polled while timing it.
const POLL: Duration = Duration::from_millis(50);

/// One timed run of one tool.
#[derive(Debug, Clone, Default)]
pub struct ToolRun {
    /// Time and traffic.
    pub traffic: Traffic,
    /// CPU time (user + system) of the tool on both hosts.
    pub cpu: Duration,
}

/// Every run of every tool.
#[derive(Debug, Clone, Default)]
pub struct MirrorResults {
    /// `rsync -az SRC/ rsync://b/dst/`.
    pub rsync: Vec<ToolRun>,
    /// lsyncd's startup sync.
    pub lsyncd: Vec<ToolRun>,
    /// `doppel protect SRC --to b:7340` until everything is acknowledged.
    pub doppel: Vec<ToolRun>,
    /// rsync's `--stats` of its last run.
    pub rsync_stats: rsyncd::Stats,
    /// doppel's status when its last run had caught up.
    pub doppel_status: JobStatus,
}

/// The last doppel run, still protecting the tree (the lag measurement goes on with it).
pub struct Running {
    /// The target.
    pub target: TargetProc,
    /// The agent.
    pub agent: Agent,
    /// Its replica.
    pub replica: PathBuf,
}

/// Runs each tool `runs` times, alternating.
pub fn run(env: &Env, tree: &TreeInfo) -> Result<(MirrorResults, Running)> {
    let mut r = MirrorResults::default();
    let mut running: Option<Running> = None;
    for i in 0..env.args.runs {
        let n = format!("run {}/{}", i + 1, env.args.runs);
        if let Some(previous) = running.take() {
            stop_doppel(previous, &env.scratch.src())?;
            remove_if_present(&env.scratch.wan(&format!("doppel-{}", i - 1)))?;
        }
        let (run, stats) = time_rsync(env)?;
        eprintln!("[bench] {n}: rsync -az {}", describe(env, &run));
        r.rsync.push(run);
        r.rsync_stats = stats;
        if env.lsyncd {
            let run = time_lsyncd(env)?;
            eprintln!("[bench] {n}: lsyncd startup {}", describe(env, &run));
            r.lsyncd.push(run);
        }
        let (run, status, doppel) = time_doppel(env, i)?;
        eprintln!("[bench] {n}: doppel {} ({} ops)", describe(env, &run), status.acked);
        r.doppel.push(run);
        r.doppel_status = status;
        running = Some(doppel);
    }
    let running = running.expect("at least one run");
    verify(&env.scratch.src(), &running.replica)?;
    eprintln!("[bench] every copy equals the source ({} files)", tree.files());
    Ok((r, running))
}

/// The rsync destination (kept for the lag measurement).
pub fn rsync_dst(env: &Env) -> PathBuf {
    env.scratch.wan("rsync-dst")
}

/// The lsyncd destination (kept for the lag measurement).
pub fn lsyncd_dst(env: &Env) -> PathBuf {
    env.scratch.wan("lsyncd-dst")
}

fn time_rsync(env: &Env) -> Result<(ToolRun, rsyncd::Stats)> {
    let (src, dst) = (env.scratch.src(), rsync_dst(env));
    remove_if_present(&dst)?;
    let daemon = Daemon::start(&env.net.b, &env.wire.b_ip, RSYNC_PORT, &dst, &env.scratch.wan("work"))?;
    prepare_cold()?;
    let before = (cpu::of_waited_children()?, daemon.cpu()?);
    let (stats, traffic) = measured(&env.wire, || rsyncd::push(&env.net.a, &["-az"], &src, &daemon.url))?;
    let cpu = cpu::of_waited_children()? - before.0 + daemon.cpu()? - before.1;
    verify(&src, &dst)?;
    Ok((ToolRun { traffic, cpu }, stats))
}

fn time_lsyncd(env: &Env) -> Result<ToolRun> {
    let (src, dst) = (env.scratch.src(), lsyncd_dst(env));
    remove_if_present(&dst)?;
    let daemon = Daemon::start(&env.net.b, &env.wire.b_ip, RSYNC_PORT, &dst, &env.scratch.wan("work"))?;
    prepare_cold()?;
    let d0 = daemon.cpu()?;
    let work = env.scratch.wan("lsyncd");
    let (l, traffic) = measured(&env.wire, || {
        let mut l = Lsyncd::start(&env.net.a, &src, &daemon.url, 0, &work)?;
        l.wait_startup(Duration::from_secs(3600))?;
        Ok(l)
    })?;
    let cpu = l.cpu()? + daemon.cpu()? - d0;
    let mut l = l;
    l.stop();
    verify(&src, &dst)?;
    Ok(ToolRun { traffic, cpu })
}

fn time_doppel(env: &Env, i: usize) -> Result<(ToolRun, JobStatus, Running)> {
    let homes = Homes::new(&env.scratch.wan(&format!("doppel-{i}")));
    remove_if_present(&homes.work)?;
    let target = remote::start_target(&env.doppel, &env.net.b, &homes, &env.target_listen(), "")?;
    prepare_cold()?;
    let t0 = cpu::of_process(target.pid())?;
    let ((mut agent, status), traffic) = measured(&env.wire, || {
        let mut agent =
            remote::start_agent(&env.doppel, &env.net.a, &homes, &env.scratch.src(), &target, &[])?;
        let (_, status) = agent.wait_caught_up(POLL, Duration::from_secs(3600))?;
        Ok((agent, status))
    })?;
    let cpu = agent.cpu()? + cpu::of_process(target.pid())? - t0;
    agent.check_alive()?;
    Ok((ToolRun { traffic, cpu }, status, Running { target, agent, replica: homes.replica() }))
}

/// Stops the agent (it must exit cleanly) and the target, and verifies the replica against
/// `src`.
pub fn stop_doppel(r: Running, src: &Path) -> Result<()> {
    let Running { mut target, agent, replica } = r;
    agent.stop()?;
    target.stop();
    verify(src, &replica)
}

fn describe(env: &Env, r: &ToolRun) -> String {
    format!(
        "{:.1} s, {:.1} MiB a->b, {:.0} % of the link on average, {:.0} % while busy, {:.1} s CPU",
        r.traffic.wall.as_secs_f64(),
        r.traffic.a_to_b as f64 / (1u64 << 20) as f64,
        100.0 * r.traffic.utilisation(env.wire.rate_bytes()),
        100.0 * r.traffic.log.steady_rate(env.wire.rate_bytes()) / env.wire.rate_bytes(),
        r.cpu.as_secs_f64()
    )
}
