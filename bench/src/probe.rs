//! Replication lag under load, two ways: the agent's own view (`doppel status --json` polled
//! on a fixed period) and end to end (small probe files written through the mount, each
//! stamped with the time its writing began, and the time they appear in the replica, seen
//! with inotify there).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use inotify::{EventMask, Inotify, WatchMask};
use rustix::event::{PollFd, PollFlags, Timespec, poll};

use crate::agent::Agent;
use crate::stats::Sample;

/// Size of a probe file.
const PROBE_SIZE: usize = 512;

/// One poll of `doppel status --json`.
#[derive(Debug, Clone, Copy, Default)]
pub struct StatusPoint {
    /// `lag_seconds`: age of the oldest unacknowledged op.
    pub lag: f64,
    /// `pending_bytes`.
    pub pending: u64,
    /// `spooled_bytes` (in `fuse` mode every pending op is written through to the spool).
    pub spooled: u64,
    /// `dirty_regions`: hot regions of the activity log.
    pub dirty_regions: u64,
}

/// Polls the agent's status every `every` (absolute deadlines; a slow poll skips the ones it
/// overran) until `stop`.
pub fn poll_status(agent: &Agent, every: Duration, stop: &AtomicBool) -> Vec<StatusPoint> {
    let mut points = Vec::new();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(Some(s)) = agent.status() {
            points.push(StatusPoint {
                lag: s.lag_seconds,
                pending: s.pending_bytes,
                spooled: s.spooled_bytes,
                dirty_regions: s.dirty_regions,
            });
        }
        next += every;
        let now = Instant::now();
        while next < now {
            next += every;
        }
        sleep(next - now);
    }
    points
}

/// The name of probe `k` of a run.
fn probe_name(prefix: &str, k: u64) -> String {
    format!("{prefix}{k:05}")
}

/// A probe's content: `probe=K t=NS\n`, padded with spaces to [`PROBE_SIZE`].
fn record(k: u64, t_ns: u64) -> Vec<u8> {
    crate::lag::stamped("probe", k, t_ns, PROBE_SIZE)
}

/// A whole probe only: a shorter file is one still being written.
fn parse(buf: &[u8]) -> Option<(u64, u64)> {
    if buf.len() != PROBE_SIZE {
        return None;
    }
    crate::lag::read_stamp("probe", buf)
}

/// What the probe writer did.
#[derive(Debug, Clone, Default)]
pub struct Written {
    /// Probes written.
    pub count: u64,
    /// How long creating, writing and closing each probe took on the source.
    pub write_times: Sample,
}

/// Creates probe `k` in `dir` every `every` (absolute deadlines) until `stop`; each holds the
/// time its creation began.
pub fn write_probes(dir: &Path, prefix: &str, every: Duration, stop: &AtomicBool) -> Result<Written> {
    let start = Instant::now();
    let mut times = Vec::new();
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let due = start + every * k as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            sleep(wait);
            continue;
        }
        let path = dir.join(probe_name(prefix, k));
        let t = Instant::now();
        let mut f = fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        f.write_all(&record(k, crate::lag::epoch_ns()))
            .with_context(|| format!("writing {}", path.display()))?;
        drop(f);
        times.push(t.elapsed());
        k += 1;
    }
    Ok(Written { count: k, write_times: Sample::new(times) })
}

/// Watches the replica's probe directory and records when each probe first appears there
/// complete.
pub struct Watcher {
    inotify: Inotify,
    dir: PathBuf,
    prefix: String,
    /// Probe number -> lag.
    seen: HashMap<u64, Duration>,
    overflows: u64,
}

impl Watcher {
    /// Watches `dir` (which must exist) from now on, for probes named `prefix*`.
    pub fn new(dir: &Path, prefix: &str) -> Result<Watcher> {
        let inotify = Inotify::init().context("inotify_init")?;
        let mask = WatchMask::CLOSE_WRITE | WatchMask::MODIFY | WatchMask::MOVED_TO | WatchMask::CREATE;
        inotify.watches().add(dir, mask).with_context(|| format!("watching {}", dir.display()))?;
        Ok(Watcher {
            inotify,
            dir: dir.to_path_buf(),
            prefix: prefix.to_string(),
            seen: HashMap::new(),
            overflows: 0,
        })
    }

    /// Reads events until `stop`, counting the probes seen in `count`; returns the lag of
    /// every probe seen and the number of inotify queue overflows (each followed by a read of
    /// every file).
    pub fn run(mut self, stop: &AtomicBool, count: &AtomicU64) -> Result<(HashMap<u64, Duration>, u64)> {
        let mut buf = vec![0u8; 64 << 10];
        let tick = Timespec { tv_sec: 0, tv_nsec: 20_000_000 };
        while !stop.load(Ordering::Relaxed) {
            let mut fds = [PollFd::new(&self.inotify, PollFlags::IN)];
            match poll(&mut fds, Some(&tick)) {
                Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(e).context("polling inotify"),
            }
            let mut names = Vec::new();
            let mut overflow = false;
            match self.inotify.read_events(&mut buf) {
                Ok(events) => {
                    for ev in events {
                        overflow |= ev.mask.contains(EventMask::Q_OVERFLOW);
                        names.extend(ev.name.map(OsStr::to_os_string));
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e).context("reading inotify events"),
            }
            if overflow {
                self.overflows += 1;
                names = fs::read_dir(&self.dir)?.filter_map(|e| e.ok().map(|e| e.file_name())).collect();
            }
            names.sort();
            names.dedup();
            for name in names {
                if self.read(&name) {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok((self.seen, self.overflows))
    }

    /// Reads one reported file; returns whether it was a probe seen for the first time.
    fn read(&mut self, name: &OsStr) -> bool {
        if !name.to_string_lossy().starts_with(&self.prefix) {
            return false;
        }
        let Ok(content) = fs::read(self.dir.join(name)) else { return false };
        let now = crate::lag::epoch_ns();
        // Not complete yet (created, not yet written): the write's event follows.
        let Some((k, t)) = parse(&content) else { return false };
        if OsStr::new(&probe_name(&self.prefix, k)) != name {
            return false;
        }
        match self.seen.entry(k) {
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Duration::from_nanos(now.saturating_sub(t)));
                true
            }
            std::collections::hash_map::Entry::Occupied(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_round_trip() {
        let r = record(7, 1_700_000_000_000_000_001);
        assert_eq!(r.len(), PROBE_SIZE);
        assert_eq!(parse(&r), Some((7, 1_700_000_000_000_000_001)));
        assert_eq!(parse(&r[..10]), None);
        assert_eq!(probe_name("r1-", 3), "r1-00003");
    }
}
