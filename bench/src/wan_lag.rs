//! Lag of small updates over the link: the same stream of in-place updates to 1 KiB files
//! (see [`crate::lag`]) with each tool in turn keeping the destination up to date: doppel,
//! lsyncd (inotify, then rsync of the changed names, at once: `delay = 0`), and rsync run in
//! a loop over the whole tree (what a cron job does, as often as it can). One tool at a time,
//! so no tool's traffic slows another's.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, sleep};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use doppel_testkit::{Compare, compare_trees};

use crate::cpu;
use crate::lag::{self, Watcher};
use crate::lsyncd::Lsyncd;
use crate::mirror::verify;
use crate::rsyncd::{self, Daemon};
use crate::stats::Sample;
use crate::wan::{Env, RSYNC_PORT, Traffic, measured};
use crate::wan_mirror::{Running, lsyncd_dst, rsync_dst, stop_doppel};

/// How long the pool and the end of the stream may take to reach the destination.
const CATCH_UP: Duration = Duration::from_secs(600);

/// What one tool's run found.
#[derive(Debug, Clone, Default)]
pub struct ToolLag {
    /// `doppel`, `lsyncd`, `rsync loop`.
    pub tool: String,
    /// From the pool's creation until the destination held it.
    pub pool_replicated: Duration,
    /// Updates written.
    pub updates: u64,
    /// How long writing them took.
    pub stream: Duration,
    /// Lag of every update seen at the destination.
    pub lags: Sample,
    /// Updates replaced by a later one of the same file before seen.
    pub coalesced: u64,
    /// Last updates of a file never seen.
    pub missed: u64,
    /// inotify overflows at the destination.
    pub overflows: u64,
    /// From the last write until the destination equalled the source.
    pub drained: Duration,
    /// Traffic from the first update until drained.
    pub traffic: Traffic,
    /// For the rsync loop: the time of each pass.
    pub passes: Sample,
}

/// Measures doppel (with the agent the mirror left running), then lsyncd, then the rsync loop.
pub fn run(env: &Env, running: Running) -> Result<Vec<ToolLag>> {
    let src = env.scratch.src();
    let src_lag = src.join("lag");
    lag::make_pool(&src_lag, env.args.pool)?;
    let mut out = Vec::new();

    let dst_lag = running.replica.join("lag");
    let agent = &running.agent;
    let converged = || -> Result<bool> {
        Ok(agent.status()?.is_some_and(|s| s.caught_up())
            && compare_trees(&src_lag, &dst_lag, Compare::default()).is_ok())
    };
    out.push(measure(env, "doppel", &src_lag, &dst_lag, &converged)?);
    stop_doppel(running, &src)?;

    if env.lsyncd {
        let dst = lsyncd_dst(env);
        let daemon = Daemon::start(&env.net.b, &env.wire.b_ip, RSYNC_PORT, &dst, &env.scratch.wan("work"))?;
        let mut l = Lsyncd::start(&env.net.a, &src, &daemon.url, 0, &env.scratch.wan("lsyncd"))?;
        l.wait_startup(CATCH_UP)?;
        let dst_lag = dst.join("lag");
        let converged = || Ok(compare_trees(&src_lag, &dst_lag, Compare::default()).is_ok());
        let r = measure(env, "lsyncd", &src_lag, &dst_lag, &converged);
        l.check_alive()?;
        l.stop();
        out.push(r?);
        verify(&src, &dst)?;
    }

    let dst = rsync_dst(env);
    let daemon = Daemon::start(&env.net.b, &env.wire.b_ip, RSYNC_PORT, &dst, &env.scratch.wan("work"))?;
    let rsync_loop = RsyncLoop::new(&env.net.a, &src, &daemon.url);
    let dst_lag = dst.join("lag");
    let mut r = thread::scope(|s| {
        let looping = s.spawn(|| rsync_loop.run());
        let converged = || Ok(compare_trees(&src_lag, &dst_lag, Compare::default()).is_ok());
        let r = measure(env, "rsync -az, in a loop", &src_lag, &dst_lag, &converged);
        rsync_loop.stop.store(true, Ordering::Relaxed);
        looping.join().map_err(|_| anyhow!("rsync loop panicked"))??;
        r
    })?;
    r.passes = Sample::new(rsync_loop.passes.into_inner().unwrap_or_default());
    out.push(r);
    verify(&src, &dst)?;
    Ok(out)
}

/// Waits until the destination holds the pool, then writes the stream and times when each
/// update shows up there, and when the destination equals the source again.
fn measure(
    env: &Env,
    tool: &str,
    src_lag: &Path,
    dst_lag: &Path,
    converged: &(dyn Fn() -> Result<bool> + Sync),
) -> Result<ToolLag> {
    let a = env.args;
    let updates = a.rate * a.lag_secs;
    let mut r = ToolLag { tool: tool.to_string(), updates, ..Default::default() };
    let t = Instant::now();
    wait(converged, tool)?;
    r.pool_replicated = t.elapsed();
    eprintln!(
        "[bench] {tool}: pool of {} files at the destination after {:.1} s",
        a.pool,
        t.elapsed().as_secs_f64()
    );
    if !cpu::wait_quiet(Duration::from_secs(120))? {
        eprintln!("[bench] warning: the machine stayed busy (other processes); measuring anyway");
    }
    let watcher = Watcher::new(dst_lag, a.pool, updates)?;
    let stop = AtomicBool::new(false);
    let seen = thread::scope(|s| -> Result<_> {
        let watching = s.spawn(|| watcher.run(&stop));
        let result = measured(&env.wire, || {
            let (stream, _late) = lag::write_stream(src_lag, a.pool, a.rate, updates)?;
            let t = Instant::now();
            wait(converged, tool)?;
            Ok((stream, t.elapsed()))
        });
        sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        let seen = watching.join().map_err(|_| anyhow!("watcher panicked"))??;
        let ((stream, drained), traffic) = result?;
        (r.stream, r.drained, r.traffic) = (stream, drained, traffic);
        Ok(seen)
    })?;
    r.overflows = seen.overflows;
    (r.coalesced, r.missed) = lag::classify(&seen.first_seen, a.pool as u64);
    r.lags = Sample::new(seen.first_seen.into_iter().flatten().collect());
    eprintln!(
        "[bench] {tool}: lag p50 {:.0} ms, p99 {:.0} ms, {} seen of {updates}",
        r.lags.percentile(50.0).as_secs_f64() * 1e3,
        r.lags.percentile(99.0).as_secs_f64() * 1e3,
        r.lags.len()
    );
    Ok(r)
}

fn wait(converged: &(dyn Fn() -> Result<bool> + Sync), tool: &str) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < CATCH_UP {
        if converged()? {
            return Ok(());
        }
        sleep(Duration::from_millis(20));
    }
    bail!("{tool}: the destination did not catch up within {CATCH_UP:?}")
}

/// `rsync -az SRC/ URL` over and over until stopped.
struct RsyncLoop<'a> {
    ns: &'a str,
    src: &'a Path,
    url: &'a str,
    stop: AtomicBool,
    passes: Mutex<Vec<Duration>>,
}

impl<'a> RsyncLoop<'a> {
    fn new(ns: &'a str, src: &'a Path, url: &'a str) -> RsyncLoop<'a> {
        RsyncLoop { ns, src, url, stop: AtomicBool::new(false), passes: Mutex::new(Vec::new()) }
    }

    fn run(&self) -> Result<()> {
        while !self.stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            rsyncd::push(self.ns, &["-az"], self.src, self.url).context("a pass of the rsync loop")?;
            self.passes.lock().expect("passes").push(t.elapsed());
        }
        Ok(())
    }
}
