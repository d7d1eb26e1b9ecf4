//! The initial mirror: `rsync -a SRC/ DST/` against `doppel protect SRC --to DST` until the
//! replica holds everything, both from a cold page cache into an empty destination.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use doppel_testkit::{Compare, compare_trees};

use crate::CoreArgs;
use crate::agent::{Agent, JobStatus};
use crate::cpu::{self, Meter};
use crate::machine;
use crate::scratch::{Scratch, remove_if_present};
use crate::tree::TreeInfo;

/// How often the agent's status is polled while timing it.
const POLL: Duration = Duration::from_millis(20);
/// How long to wait for other users of the machine to go quiet before a timed run.
const QUIET_WAIT: Duration = Duration::from_secs(120);

/// One timed run of one tool.
#[derive(Debug, Clone, Copy, Default)]
pub struct Run {
    /// Wall-clock time.
    pub wall: Duration,
    /// CPU time (user + system) of the tool's processes.
    pub cpu: Duration,
    /// CPU time of everything else meanwhile (other processes, kernel threads).
    pub others: Duration,
}

/// The timings of every run.
#[derive(Debug, Clone, Default)]
pub struct MirrorResults {
    /// `rsync -a` alone (its writes may still be dirty in the page cache when it exits).
    pub rsync: Vec<Run>,
    /// `rsync -a` followed by `sync`: the copy on disk, as doppel's acknowledgement means.
    pub rsync_synced: Vec<Duration>,
    /// doppel from process start until everything captured is acknowledged.
    pub doppel: Vec<Run>,
    /// doppel's status when the last run had caught up.
    pub doppel_status: JobStatus,
}

/// The agent of the last run, still protecting the tree (the lag measurement uses it).
pub struct Running {
    /// The agent.
    pub agent: Agent,
    /// Its protected tree.
    pub src: PathBuf,
    /// Its replica.
    pub dst: PathBuf,
}

/// Runs each tool `args.runs` times, alternating, and verifies every copy.
pub fn run(
    args: &CoreArgs,
    scratch: &Scratch,
    doppel: &Path,
    tree: &TreeInfo,
) -> Result<(MirrorResults, Running)> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let src = scratch.src();
    let mut results = MirrorResults::default();
    let mut running = None;
    for i in 0..args.runs {
        let n = format!("run {}/{}", i + 1, args.runs);
        // An idle agent still watches the file system: stop it before timing anything else.
        // Only one doppel replica at a time: the disk holds three copies at most.
        if let Some(previous) = running.take() {
            stop_and_verify(previous)?;
            remove_if_present(&scratch.doppel_dst(i - 1))?;
            remove_if_present(&scratch.doppel_home(i - 1))?;
        }
        let (r, synced) = time_rsync(&src, &scratch.rsync_dst())?;
        eprintln!("[bench] {n}: rsync -a {} ({:.2} s with sync)", describe(&r), synced.as_secs_f64());
        verify(&src, &scratch.rsync_dst())?;
        results.rsync.push(r);
        results.rsync_synced.push(synced);

        let timeout = Duration::from_secs(600) + r.wall * 20;
        let (agent, r, status) = time_doppel(doppel, scratch, i, timeout, args.history.as_deref())?;
        eprintln!(
            "[bench] {n}: doppel {} (capture {}, {} files / {:.2} GiB hashed, {} ops)",
            describe(&r),
            status.capture,
            status.files_hashed,
            status.bytes_hashed as f64 / (1u64 << 30) as f64,
            status.acked
        );
        results.doppel.push(r);
        results.doppel_status = status;
        running = Some(agent);
    }
    let running = running.expect("at least one run");
    // The last agent keeps running for the lag measurement: verify its replica live.
    verify(&running.src, &running.dst)?;
    eprintln!("[bench] every copy equals the source ({} files)", tree.files());
    Ok((results, running))
}

/// Times `rsync -a` into an empty destination from a cold cache, then the `sync` after it.
fn time_rsync(src: &Path, dst: &Path) -> Result<(Run, Duration)> {
    remove_if_present(dst)?;
    prepare_cold()?;
    let (meter, children) = (Meter::start()?, cpu::of_waited_children()?);
    let t = Instant::now();
    let st = Command::new("rsync").arg("-a").arg(slash(src)).arg(slash(dst)).status()?;
    let wall = t.elapsed();
    let run = Run { wall, cpu: cpu::of_waited_children()? - children, others: meter.others(Duration::ZERO)? };
    if !st.success() {
        bail!("rsync -a {} {} failed: {st}", slash(src), slash(dst));
    }
    machine::sync();
    Ok((run, t.elapsed()))
}

/// Times a fresh doppel (new home, empty destination) from a cold cache until caught up.
fn time_doppel(
    doppel: &Path,
    scratch: &Scratch,
    i: usize,
    timeout: Duration,
    history: Option<&str>,
) -> Result<(Running, Run, JobStatus)> {
    let (src, dst, home) = (scratch.src(), scratch.doppel_dst(i), scratch.doppel_home(i));
    remove_if_present(&dst)?;
    remove_if_present(&home)?;
    prepare_cold()?;
    let meter = Meter::start()?;
    let extra: Vec<&str> = history.map(|h| vec!["--history", h]).unwrap_or_default();
    let mut agent = Agent::start_with(doppel, &home, &src, &dst, &extra)?;
    let (wall, status) = agent.wait_caught_up(POLL, timeout)?;
    let cpu = agent.cpu()?;
    let run = Run { wall, cpu, others: meter.others(cpu)? };
    Ok((Running { agent, src, dst }, run, status))
}

/// Puts the machine in the same state before every timed run: nothing dirty, nobody else
/// busy (as far as waiting helps), and an empty page cache.
pub(crate) fn prepare_cold() -> Result<()> {
    machine::sync();
    if !cpu::wait_quiet(QUIET_WAIT)? {
        eprintln!(
            "[bench] warning: the machine stayed busy for {QUIET_WAIT:?} (other processes); timing anyway, \
             see the 'CPU of everything else' row"
        );
    }
    machine::drop_caches()
}

fn describe(r: &Run) -> String {
    format!(
        "{:.2} s, {:.2} s CPU, {:.2} s CPU of everything else",
        r.wall.as_secs_f64(),
        r.cpu.as_secs_f64(),
        r.others.as_secs_f64()
    )
}

fn stop_and_verify(r: Running) -> Result<()> {
    r.agent.stop()?;
    verify(&r.src, &r.dst)
}

/// The copy must equal the source exactly (names, types, modes, owners, times, content).
pub(crate) fn verify(src: &Path, dst: &Path) -> Result<()> {
    if let Err(diffs) = compare_trees(src, dst, Compare::default()) {
        bail!("the copy {} differs from the source:\n{diffs}", dst.display());
    }
    Ok(())
}

/// `dir/`: rsync copies the contents of a directory named with a trailing slash.
fn slash(p: &Path) -> String {
    format!("{}/", p.display())
}
