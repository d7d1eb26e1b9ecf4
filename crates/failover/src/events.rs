//! The event log: every monitor verdict and failover or failback step, with its time.
//!
//! One JSON object per line in `DATA/events.jsonl`, appended and synced, so the history of
//! what happened survives the target's own restarts; `doppel events` shows it.

use parking_lot::Mutex;
use std::fs::OpenOptions;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When, in microseconds since the epoch.
    pub time_us: u64,
    /// The source.
    pub source: String,
    /// The job, if the event is about one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// What happened (`source-silent`, `failover-step`, `failover-done`...).
    pub kind: String,
    /// The step, for step events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// `started`, `done`, `skipped` (already done by an earlier run) or `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// More, in words.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// Milliseconds the step (or the whole failover: the recovery time) took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub millis: Option<u64>,
}

impl Event {
    /// An event of `kind` about `source`, now.
    pub fn new(source: &str, kind: &str) -> Event {
        Event {
            time_us: doppel_link::framed::now_us(),
            source: source.to_string(),
            job: None,
            kind: kind.to_string(),
            step: None,
            status: None,
            detail: String::new(),
            millis: None,
        }
    }

    /// At `time_us` rather than now.
    pub fn at(mut self, time_us: u64) -> Event {
        self.time_us = time_us;
        self
    }

    /// About `job`.
    pub fn job(mut self, job: &str) -> Event {
        self.job = Some(job.to_string());
        self
    }

    /// A step and its status.
    pub fn step(mut self, step: &str, status: &str) -> Event {
        self.step = Some(step.to_string());
        self.status = Some(status.to_string());
        self
    }

    /// With words.
    pub fn detail(mut self, d: impl Into<String>) -> Event {
        self.detail = d.into();
        self
    }

    /// With a duration.
    pub fn millis(mut self, ms: u64) -> Event {
        self.millis = Some(ms);
        self
    }
}

/// The log.
pub struct EventLog {
    path: PathBuf,
    lock: Mutex<()>,
}

impl EventLog {
    /// The log at `path` (created on first event).
    pub fn new(path: &Path) -> EventLog {
        EventLog { path: path.to_path_buf(), lock: Mutex::new(()) }
    }

    /// Appends `e` (and logs it).
    pub fn record(&self, e: Event) {
        tracing::info!(
            source = %e.source,
            job = e.job.as_deref().unwrap_or("-"),
            kind = %e.kind,
            step = e.step.as_deref().unwrap_or("-"),
            status = e.status.as_deref().unwrap_or("-"),
            detail = %e.detail,
            "event"
        );
        let _g = self.lock.lock();
        let line = serde_json::to_string(&e).expect("events serialize") + "\n";
        let r = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(line.as_bytes()).and_then(|_| f.sync_data()));
        if let Err(err) = r {
            tracing::error!(error = %err, path = %self.path.display(), "cannot write the event log");
        }
    }

    /// Every event, oldest first (lines that do not parse are skipped).
    pub fn read(&self) -> io::Result<Vec<Event>> {
        match std::fs::File::open(&self.path) {
            Ok(f) => Ok(io::BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| serde_json::from_str(&l).ok())
                .collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }
}

impl crate::runner::EventSink for EventLog {
    fn record(&self, e: Event) {
        EventLog::record(self, e)
    }
}
