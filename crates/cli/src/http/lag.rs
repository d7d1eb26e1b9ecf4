//! The last minutes of every job's lag, sampled by the server so that a page opened now shows
//! them at once.

use std::collections::{BTreeMap, VecDeque};

use parking_lot::Mutex;
use serde::Serialize;

use crate::overview::{Everything, JobRow, SCHEMA};

/// Samples by series; a series not seen for a whole window is dropped.
pub struct Lags {
    kept: usize,
    series: Mutex<BTreeMap<String, VecDeque<(u64, f64)>>>,
}

/// `/api/lag`.
#[derive(Debug, Serialize)]
pub struct Report {
    schema: u32,
    interval_secs: u64,
    series: Vec<Series>,
}

/// One job's samples.
#[derive(Debug, Serialize)]
pub struct Series {
    /// `JOB` (an agent's job) or `SOURCE/JOB` (a replica on a target).
    key: String,
    /// `[unix seconds, lag seconds]`, oldest first.
    points: Vec<(u64, f64)>,
}

impl Lags {
    /// Keeps `kept` samples per series.
    pub fn new(kept: usize) -> Lags {
        Lags { kept, series: Mutex::new(BTreeMap::new()) }
    }

    /// Records the lags in `all` at `now` (unix seconds).
    pub fn record(&self, now: u64, all: &Everything) {
        let mut points: Vec<(String, f64)> = Vec::new();
        for j in &all.jobs {
            if let JobRow::Running(j) = j {
                points.push((j.job.clone(), j.lag_seconds));
            }
        }
        for r in &all.replicas {
            if let Some(lag) = r.apply_lag_seconds.filter(|_| r.connected) {
                points.push((format!("{}/{}", r.source, r.job), lag));
            }
        }
        let mut series = self.series.lock();
        for (key, lag) in points {
            let s = series.entry(key).or_default();
            s.push_back((now, lag));
            while s.len() > self.kept {
                s.pop_front();
            }
        }
        let window = self.kept as u64 * 2;
        series.retain(|_, s| s.back().is_some_and(|(t, _)| now.saturating_sub(*t) <= window));
    }

    /// Every series, for `/api/lag`.
    pub fn report(&self, interval_secs: u64) -> Report {
        let series = self
            .series
            .lock()
            .iter()
            .map(|(key, s)| Series { key: key.clone(), points: s.iter().copied().collect() })
            .collect();
        Report { schema: SCHEMA, interval_secs, series }
    }
}
