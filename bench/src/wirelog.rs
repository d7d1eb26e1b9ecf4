//! How full a tool kept the link: the bytes crossing it sampled every 100 ms while the tool
//! runs, so the report can tell the average over the whole transfer (startup, scanning and
//! the tail included) from the rate while data was actually flowing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::delay::Wire;

/// Sampling period.
const EVERY: Duration = Duration::from_millis(100);

/// Bytes a sent to b over time.
#[derive(Debug, Clone, Default)]
pub struct WireLog {
    /// (seconds since the start, bytes a to b since the start), every 100 ms.
    pub points: Vec<(f64, u64)>,
}

impl WireLog {
    /// Samples `wire` until `stop`.
    pub fn record(wire: &Wire, stop: &AtomicBool) -> WireLog {
        let (t, base) = (Instant::now(), wire.bytes_a_to_b());
        let mut points = vec![(0.0, 0)];
        let mut next = t;
        while !stop.load(Ordering::Relaxed) {
            next += EVERY;
            sleep(next.saturating_duration_since(Instant::now()));
            points.push((t.elapsed().as_secs_f64(), wire.bytes_a_to_b() - base));
        }
        WireLog { points }
    }

    /// Median rate over one-second windows from the first to the last second in which data
    /// moved at more than 10 % of `rate` (bytes per second): the rate while transferring.
    pub fn steady_rate(&self, rate: f64) -> f64 {
        let per_sec: Vec<f64> = self
            .points
            .windows(11)
            .step_by(10)
            .map(|w| (w[10].1 - w[0].1) as f64 / (w[10].0 - w[0].0).max(1e-3))
            .collect();
        let busy: Vec<usize> = (0..per_sec.len()).filter(|&i| per_sec[i] > rate * 0.1).collect();
        let (Some(&first), Some(&last)) = (busy.first(), busy.last()) else { return 0.0 };
        let mut v = per_sec[first..=last].to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_rate_ignores_idle_ends() {
        // 2 s idle, 3 s at 100 bytes/s, 1 s idle.
        let mut points = Vec::new();
        let mut bytes = 0;
        for i in 0..=60 {
            let t = i as f64 / 10.0;
            if (2.0..5.0).contains(&t) {
                bytes += 10;
            }
            points.push((t, bytes));
        }
        let log = WireLog { points };
        assert!((log.steady_rate(100.0) - 100.0).abs() < 1.0, "{}", log.steady_rate(100.0));
    }
}
