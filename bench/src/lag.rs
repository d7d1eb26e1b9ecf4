//! Replication lag under a steady stream of small in-place updates.
//!
//! A pool of 1 KiB files under `SRC/lag/` is overwritten round-robin at a fixed rate, each
//! write stamped with its sequence number and wall-clock time. A watcher on the replica's
//! `DST/lag/` reads each file as soon as inotify says it changed there, and the lag of an
//! update is the time it was first seen minus its stamp. Both ends use the same clock, so
//! no synchronisation is involved; the watcher sees an update when it is in the replica's
//! page cache, before the target's group commit makes it durable (the agent's own
//! `lag_seconds`, the age of the oldest unacknowledged op, includes that commit).

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, sleep};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use doppel_testkit::{Compare, compare_trees};
use inotify::{EventMask, Inotify, WatchMask};
use rustix::event::{PollFd, PollFlags, Timespec, poll};

use crate::CoreArgs;
use crate::agent::Agent;
use crate::cpu::{self, Meter};
use crate::mirror::Running;
use crate::stats::Sample;

/// Size of every pool file and of every update.
const RECORD: usize = 1024;
/// How often `doppel status --json` is polled during the stream.
const STATUS_EVERY: Duration = Duration::from_millis(100);
/// How long the pool and the end of the stream may take to reach the replica.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(300);

/// What the lag measurement found.
#[derive(Debug, Clone, Default)]
pub struct LagResults {
    /// Files in the pool.
    pub pool: usize,
    /// From the first pool file written until the replica held them all.
    pub pool_replicated: Duration,
    /// Updates written.
    pub updates: u64,
    /// How long writing them took (the target is `updates / rate`).
    pub stream: Duration,
    /// How late the writer started updates against their schedule.
    pub lateness: Sample,
    /// Lag of every update the watcher saw.
    pub lags: Sample,
    /// Updates never seen because a later update of the same file replaced them first.
    pub coalesced: u64,
    /// Last updates of a file never seen (would mean a lost update or a lost event).
    pub missed: u64,
    /// inotify queue overflows on the replica side (each followed by a full re-read).
    pub overflows: u64,
    /// From the last write until the replica equalled the source and everything was acked.
    pub drained: Duration,
    /// The largest `lag_seconds` among the status polls.
    pub status_max_lag: f64,
    /// The largest `pending_bytes` among the status polls.
    pub status_max_pending: u64,
    /// Status polls made.
    pub status_polls: u64,
    /// CPU time of the doppel agent from the first update until the replica was equal.
    pub agent_cpu: Duration,
    /// CPU time of everything else meanwhile (other processes, kernel threads).
    pub others_cpu: Duration,
}

/// Measures the lag with the agent left running by the mirror measurement, then stops it and
/// checks the whole replica once more.
pub fn run(args: &CoreArgs, running: Running) -> Result<LagResults> {
    let Running { mut agent, src, dst } = running;
    let (src_lag, dst_lag) = (src.join("lag"), dst.join("lag"));
    let mut r = LagResults { pool: args.pool, updates: args.rate * args.lag_secs, ..Default::default() };
    if args.pool == 0 || args.rate == 0 {
        bail!("--pool and --rate must be positive");
    }

    let t = Instant::now();
    make_pool(&src_lag, args.pool)?;
    wait_replicated(&agent, &src_lag, &dst_lag)?;
    r.pool_replicated = t.elapsed();
    eprintln!("[bench] pool of {} files replicated in {:.2} s", args.pool, r.pool_replicated.as_secs_f64());

    if !cpu::wait_quiet(Duration::from_secs(120))? {
        eprintln!("[bench] warning: the machine stayed busy (other processes); measuring anyway");
    }
    eprintln!("[bench] writing {} updates/s for {} s", args.rate, args.lag_secs);
    let (meter, cpu_before) = (Meter::start()?, agent.cpu()?);
    let (seen, status) = stream_and_watch(args, &agent, &src_lag, &dst_lag, &mut r)?;
    r.agent_cpu = agent.cpu()? - cpu_before;
    r.others_cpu = meter.others(r.agent_cpu)?;
    (r.status_max_lag, r.status_max_pending, r.status_polls) = status;
    r.overflows = seen.overflows;
    (r.coalesced, r.missed) = classify(&seen.first_seen, args.pool as u64);
    r.lags = Sample::new(seen.first_seen.into_iter().flatten().collect());

    agent.check_alive()?;
    agent.stop()?;
    if let Err(diffs) = compare_trees(&src, &dst, Compare::default()) {
        bail!("after the lag run the replica differs from the source:\n{diffs}");
    }
    Ok(r)
}

/// Writes the update stream while a watcher reads the replica and a poller asks the agent's
/// status; waits until the replica holds the last update. Fills the stream's timings in `r`;
/// returns what the watcher saw and the poller's maxima.
fn stream_and_watch(
    args: &CoreArgs,
    agent: &Agent,
    src_lag: &Path,
    dst_lag: &Path,
    r: &mut LagResults,
) -> Result<(Seen, (f64, u64, u64))> {
    // The watch is in place before the first update, so no event can be missed.
    let watcher = Watcher::new(dst_lag, args.pool, r.updates)?;
    let (stop_watch, stop_status) = (AtomicBool::new(false), AtomicBool::new(false));
    thread::scope(|s| {
        let watching = s.spawn(|| watcher.run(&stop_watch));
        let polling = s.spawn(|| poll_status(agent, &stop_status));
        let stream = write_stream(src_lag, args.pool, args.rate, r.updates);
        let drained = stream.as_ref().ok().map(|_| wait_replicated(agent, src_lag, dst_lag));
        // The replica is complete: the watcher only has the last events to read.
        sleep(Duration::from_millis(200));
        stop_watch.store(true, Ordering::Relaxed);
        stop_status.store(true, Ordering::Relaxed);
        let seen = watching.join().expect("watcher thread")?;
        let status = polling.join().expect("status thread");
        (r.stream, r.lateness) = stream?;
        r.drained = drained.expect("the stream was written")?;
        Ok((seen, status))
    })
}

/// The name of pool file `i`.
fn pool_name(i: u64) -> String {
    format!("f{i:05}")
}

/// The pool file update `seq` (from 1) goes to: round-robin.
fn file_of(seq: u64, pool: u64) -> u64 {
    (seq - 1) % pool
}

/// One update: `seq=N t=NS\n`, padded with spaces to [`RECORD`] bytes (the last one a newline).
fn record(seq: u64, t_ns: u64) -> Vec<u8> {
    stamped("seq", seq, t_ns, RECORD)
}

/// A `size`-byte record whose first line is `TAG=N t=T_NS`, padded with spaces: what the lag
/// writers put in a file, so the watcher on the other side can tell which write it sees and
/// when it was made.
pub fn stamped(tag: &str, n: u64, t_ns: u64, size: usize) -> Vec<u8> {
    let mut buf = vec![b' '; size];
    let head = format!("{tag}={n} t={t_ns}\n");
    buf[..head.len()].copy_from_slice(head.as_bytes());
    buf[size - 1] = b'\n';
    buf
}

/// The `(N, T_NS)` of a [`stamped`] record with `tag`.
pub fn read_stamp(tag: &str, buf: &[u8]) -> Option<(u64, u64)> {
    let line = std::str::from_utf8(&buf[..buf.iter().position(|&b| b == b'\n')?]).ok()?;
    let (n, t) = line.strip_prefix(tag)?.strip_prefix('=')?.split_once(" t=")?;
    Some((n.parse().ok()?, t.parse().ok()?))
}

/// Parses the first line of a record: `(seq, t_ns)`.
fn parse(buf: &[u8]) -> Option<(u64, u64)> {
    read_stamp("seq", buf)
}

/// Nanoseconds since the epoch: the clock both the writer and the watcher read.
pub fn epoch_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_nanos() as u64
}

pub(crate) fn make_pool(dir: &Path, pool: usize) -> Result<()> {
    fs::create_dir_all(dir)?;
    for i in 0..pool as u64 {
        fs::write(dir.join(pool_name(i)), record(0, 0))?;
    }
    Ok(())
}

/// Waits until the agent acknowledged everything it captured and `dst` equals `src`.
/// Needs only `&Agent`, so the status poller can share the agent meanwhile.
fn wait_replicated(agent: &Agent, src: &Path, dst: &Path) -> Result<Duration> {
    let t = Instant::now();
    let mut last = None;
    while t.elapsed() < CATCH_UP_TIMEOUT {
        let status = agent.status()?;
        if status.as_ref().is_some_and(|s| s.caught_up())
            && compare_trees(src, dst, Compare::default()).is_ok()
        {
            return Ok(t.elapsed());
        }
        last = status;
        sleep(Duration::from_millis(20));
    }
    let diffs = compare_trees(src, dst, Compare::default()).err().unwrap_or_default();
    bail!(
        "{} did not reach the replica within {CATCH_UP_TIMEOUT:?}; last status {last:?}\n{diffs}\n\
         end of doppel's log {}:\n{}",
        src.display(),
        agent.log().display(),
        agent.log_tail(20)
    )
}

/// Overwrites pool files in place, round-robin, on absolute deadlines (`k / rate` seconds
/// after the start), so a slow write delays the next one but never the whole schedule.
/// Returns the time it took and how late each write started.
pub(crate) fn write_stream(dir: &Path, pool: usize, rate: u64, updates: u64) -> Result<(Duration, Sample)> {
    let names: Vec<PathBuf> = (0..pool as u64).map(|i| dir.join(pool_name(i))).collect();
    let mut late = Vec::with_capacity(updates as usize);
    let start = Instant::now();
    for k in 0..updates {
        let due = start + Duration::from_nanos(k * 1_000_000_000 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            sleep(wait);
        }
        late.push(Instant::now().saturating_duration_since(due));
        let seq = k + 1;
        let path = &names[file_of(seq, pool as u64) as usize];
        let f = fs::OpenOptions::new().write(true).open(path)?;
        f.write_all_at(&record(seq, epoch_ns()), 0)
            .with_context(|| format!("updating {}", path.display()))?;
    }
    Ok((start.elapsed(), Sample::new(late)))
}

/// Polls the agent's status until `stop`: (max `lag_seconds`, max `pending_bytes`, polls).
fn poll_status(agent: &Agent, stop: &AtomicBool) -> (f64, u64, u64) {
    let (mut max_lag, mut max_pending, mut polls) = (0.0f64, 0u64, 0u64);
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(Some(s)) = agent.status() {
            max_lag = max_lag.max(s.lag_seconds);
            max_pending = max_pending.max(s.pending_bytes);
            polls += 1;
        }
        next += STATUS_EVERY;
        sleep(next.saturating_duration_since(Instant::now()));
    }
    (max_lag, max_pending, polls)
}

/// What the watcher saw.
pub(crate) struct Seen {
    /// Per sequence number (index 0 unused): the lag when first seen.
    pub(crate) first_seen: Vec<Option<Duration>>,
    /// inotify queue overflows.
    pub(crate) overflows: u64,
}

/// Watches the replica's pool directory and reads every file inotify reports changed.
pub(crate) struct Watcher {
    inotify: Inotify,
    dir: PathBuf,
    pool: u64,
    seen: Seen,
}

impl Watcher {
    /// Watches `dir` from now on.
    pub(crate) fn new(dir: &Path, pool: usize, updates: u64) -> Result<Watcher> {
        let inotify = Inotify::init().context("inotify_init")?;
        let mask = WatchMask::CLOSE_WRITE | WatchMask::MODIFY | WatchMask::MOVED_TO | WatchMask::CREATE;
        inotify.watches().add(dir, mask).with_context(|| format!("watching {}", dir.display()))?;
        Ok(Watcher {
            inotify,
            dir: dir.to_path_buf(),
            pool: pool as u64,
            seen: Seen { first_seen: vec![None; updates as usize + 1], overflows: 0 },
        })
    }

    /// Reads events until `stop`.
    pub(crate) fn run(mut self, stop: &AtomicBool) -> Result<Seen> {
        let mut buf = vec![0u8; 256 << 10];
        let tick = Timespec { tv_sec: 0, tv_nsec: 50_000_000 };
        while !stop.load(Ordering::Relaxed) {
            let mut fds = [PollFd::new(&self.inotify, PollFlags::IN)];
            match poll(&mut fds, Some(&tick)) {
                Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(e).context("polling inotify"),
            }
            let (names, overflow) = match self.inotify.read_events(&mut buf) {
                Ok(events) => {
                    let mut names = Vec::new();
                    let mut overflow = false;
                    for ev in events {
                        overflow |= ev.mask.contains(EventMask::Q_OVERFLOW);
                        names.extend(ev.name.map(OsStr::to_os_string));
                    }
                    (names, overflow)
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e).context("reading inotify events"),
            };
            if overflow {
                self.seen.overflows += 1;
                self.read_all();
            }
            self.read_changed(names);
        }
        Ok(self.seen)
    }

    /// Reads each reported name once per batch (a write brings MODIFY and CLOSE_WRITE).
    fn read_changed(&mut self, names: Vec<OsString>) {
        let mut done = HashSet::new();
        for name in names {
            if done.insert(name.clone()) {
                self.read(&name);
            }
        }
    }

    /// After an overflow the events are lost: look at every file.
    fn read_all(&mut self) {
        for i in 0..self.pool {
            self.read(OsStr::new(&pool_name(i)));
        }
    }

    /// Records the update the replica file now holds, if it was not seen before.
    fn read(&mut self, name: &OsStr) {
        let Ok(content) = fs::read(self.dir.join(name)) else { return };
        let now = epoch_ns();
        let Some((seq, t)) = parse(&content) else { return };
        // A record whose number does not belong to this file is a torn read: ignore it, the
        // event of the write completing follows.
        let valid = seq >= 1 && (seq as usize) < self.seen.first_seen.len();
        if !valid || OsStr::new(&pool_name(file_of(seq, self.pool))) != name {
            return;
        }
        let slot = &mut self.seen.first_seen[seq as usize];
        if slot.is_none() {
            *slot = Some(Duration::from_nanos(now.saturating_sub(t)));
        }
    }
}

/// Splits the updates never seen into those a later update of the same file replaced
/// (coalesced) and last updates of their file (missed).
pub(crate) fn classify(first_seen: &[Option<Duration>], pool: u64) -> (u64, u64) {
    let updates = first_seen.len() as u64 - 1;
    let (mut coalesced, mut missed) = (0, 0);
    for seq in 1..=updates {
        if first_seen[seq as usize].is_none() {
            if seq + pool <= updates {
                coalesced += 1;
            } else {
                missed += 1;
            }
        }
    }
    (coalesced, missed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let r = record(42, 1_700_000_000_123_456_789);
        assert_eq!(r.len(), RECORD);
        assert_eq!(parse(&r), Some((42, 1_700_000_000_123_456_789)));
        assert_eq!(parse(b"garbage"), None);
    }

    #[test]
    fn unseen_updates_are_coalesced_unless_last() {
        // pool of 2, updates 1..=4: 1 and 2 have successors, 3 and 4 are last.
        let d = Some(Duration::ZERO);
        assert_eq!(classify(&[None, None, d, d, None], 2), (1, 1));
    }
}
