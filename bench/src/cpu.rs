//! CPU time, from `/proc`: how much work each tool did besides how long it took, and how much
//! the rest of the machine did meanwhile (the machine may be shared: a build running next to
//! a timed run shows up here instead of silently inflating the result).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// User plus system time `pid` has used so far (all its threads).
pub fn of_process(pid: u32) -> Result<Duration> {
    ticks(stat_fields(&format!("/proc/{pid}/stat"), &[14, 15])?)
}

/// User plus system time `pid` and its waited-for children have used so far (a daemon that
/// reaps the processes it forks per connection, as rsync's does).
pub fn of_process_tree(pid: u32) -> Result<Duration> {
    ticks(stat_fields(&format!("/proc/{pid}/stat"), &[14, 15, 16, 17])?)
}

/// User plus system time of this process's children that have exited and been waited for
/// (and of their own waited-for descendants, such as rsync's receiver and generator).
pub fn of_waited_children() -> Result<Duration> {
    ticks(stat_fields("/proc/self/stat", &[16, 17])?)
}

/// This process and its waited-for children.
fn of_self_and_children() -> Result<Duration> {
    ticks(stat_fields("/proc/self/stat", &[14, 15, 16, 17])?)
}

/// Time all CPUs together spent busy (user, nice, system, irq, softirq) since boot.
pub fn machine_busy() -> Result<Duration> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = text.lines().find(|l| l.starts_with("cpu ")).context("no cpu line in /proc/stat")?;
    let v: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().unwrap_or(0)).collect();
    // user nice system idle iowait irq softirq ...
    let busy = [0, 1, 2, 5, 6].iter().map(|&i| v.get(i).copied().unwrap_or(0)).sum();
    ticks(busy)
}

/// Waits, up to `max`, for a whole second in which the machine is nearly idle (under 10 % of
/// one CPU busy), so that a timed run does not start in the middle of someone else's work.
/// Returns whether it found one.
pub fn wait_quiet(max: Duration) -> Result<bool> {
    let t = Instant::now();
    while t.elapsed() < max {
        let before = machine_busy()?;
        std::thread::sleep(Duration::from_secs(1));
        if machine_busy()? - before < Duration::from_millis(100) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Splits the CPU time spent during a timed run between the run and everything else.
pub struct Meter {
    busy: Duration,
    mine: Duration,
}

impl Meter {
    /// Starts measuring now.
    pub fn start() -> Result<Meter> {
        Ok(Meter { busy: machine_busy()?, mine: of_self_and_children()? })
    }

    /// CPU time used since the start by anything but this process, its waited-for children
    /// and `also` (the time of a child still running, such as the doppel agent): other users'
    /// processes, and kernel threads (writeback included).
    pub fn others(&self, also: Duration) -> Result<Duration> {
        let busy = machine_busy()? - self.busy;
        let mine = of_self_and_children()? - self.mine + also;
        Ok(busy.saturating_sub(mine))
    }
}

/// Fields of a `/proc/PID/stat` file (1-based, as proc(5) numbers them), summed.
fn stat_fields(path: &str, fields: &[usize]) -> Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = text.rsplit_once(')').map(|(_, r)| r).context("malformed stat")?;
    let values: Vec<&str> = rest.split_whitespace().collect();
    fields
        .iter()
        .map(|&n| {
            values
                .get(n - 3)
                .and_then(|f| f.parse::<u64>().ok())
                .with_context(|| format!("field {n} of {path}"))
        })
        .sum()
}

/// Clock ticks as a duration.
fn ticks(n: u64) -> Result<Duration> {
    Ok(Duration::from_secs_f64(n as f64 / rustix::param::clock_ticks_per_second() as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_grow_with_work() {
        let (meter, busy) = (Meter::start().unwrap(), machine_busy().unwrap());
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(50) {
            std::hint::black_box(t.elapsed());
        }
        assert!(of_process(std::process::id()).unwrap() > Duration::ZERO);
        assert!(machine_busy().unwrap() > busy);
        assert!(of_waited_children().is_ok());
        assert!(meter.others(Duration::ZERO).is_ok());
    }
}
