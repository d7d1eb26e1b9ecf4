//! `/metrics`: the Prometheus text exposition of [`Everything`].
//!
//! A fresh registry is filled from the status at each scrape, so a job or replica that went
//! away leaves no stale series. Names follow Prometheus' conventions: the `doppel_` prefix,
//! base units (seconds, bytes), `_total` counters, `_timestamp_seconds` times. The labels are
//! `source` and `doppel_job`, never `job` and `instance` (Prometheus sets those on every
//! series it scrapes). A state is a set of series, one per state, 1 for the current one:
//! `doppel_source_state{state="failed-over"} == 1` is an alert that cannot miss a series.

use std::collections::HashMap;

use doppel_agent::JobStatusSnapshot;
use doppel_apply::history::HistoryStatus;
use doppel_failover::Event;
use doppel_target::{ReplicaState, ReplicaStatus};
use prometheus::{CounterVec, Encoder, GaugeVec, Opts, Registry, TextEncoder};

use crate::control::SourceRow;
use crate::overview::{Everything, JobRow};

/// What a scrape gets.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The steps a job reports (the agent's phases, and the rows of jobs not running).
const JOB_STATES: [&str; 12] = [
    "starting",
    "scanning",
    "mirroring",
    "replicating",
    "disconnected",
    "fenced",
    "refused",
    "stopped",
    "overflow",
    "target paused",
    "failback",
    "not answering",
];

const REPLICA_STATES: [&str; 5] = ["unseen", "replicating", "paused", "stopped", "disconnected"];

const SOURCE_STATES: [&str; 8] =
    ["never-seen", "alive", "stopped", "silent", "failed", "failing-over", "failed-over", "failing-back"];

/// Why the exposition could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode the metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// Label pairs of one series.
type Labels<'a> = &'a [(&'a str, &'a str)];

/// A registry filled one sample at a time; each family is registered on its first sample.
struct Exposition {
    registry: Registry,
    gauges: HashMap<&'static str, GaugeVec>,
    counters: HashMap<&'static str, CounterVec>,
}

impl Exposition {
    fn new() -> Result<Exposition, MetricsError> {
        Ok(Exposition {
            registry: Registry::new_custom(Some("doppel".into()), None)?,
            gauges: HashMap::new(),
            counters: HashMap::new(),
        })
    }

    /// Sets gauge `name` (without the prefix) of `labels` to `v`.
    fn gauge(&mut self, name: &'static str, help: &str, labels: Labels, v: f64) -> Result<(), MetricsError> {
        let family = match self.gauges.get(name) {
            Some(f) => f.clone(),
            None => {
                let names: Vec<&str> = labels.iter().map(|(k, _)| *k).collect();
                let f = GaugeVec::new(Opts::new(name, help), &names)?;
                self.registry.register(Box::new(f.clone()))?;
                self.gauges.insert(name, f.clone());
                f
            }
        };
        let values: Vec<&str> = labels.iter().map(|(_, v)| *v).collect();
        family.get_metric_with_label_values(&values)?.set(v);
        Ok(())
    }

    /// Sets counter `name` (ending in `_total`) of `labels` to `v`.
    fn counter(
        &mut self,
        name: &'static str,
        help: &str,
        labels: Labels,
        v: f64,
    ) -> Result<(), MetricsError> {
        let family = match self.counters.get(name) {
            Some(f) => f.clone(),
            None => {
                let names: Vec<&str> = labels.iter().map(|(k, _)| *k).collect();
                let f = CounterVec::new(Opts::new(name, help), &names)?;
                self.registry.register(Box::new(f.clone()))?;
                self.counters.insert(name, f.clone());
                f
            }
        };
        let values: Vec<&str> = labels.iter().map(|(_, v)| *v).collect();
        family.get_metric_with_label_values(&values)?.inc_by(v.max(0.0));
        Ok(())
    }

    /// One series per state in `all`, 1 for `current`.
    fn states(
        &mut self,
        name: &'static str,
        help: &str,
        labels: Labels,
        all: &[&str],
        current: &str,
    ) -> Result<(), MetricsError> {
        for s in all.iter().copied().chain((!all.contains(&current)).then_some(current)) {
            let mut l = labels.to_vec();
            l.push(("state", s));
            self.gauge(name, help, &l, if s == current { 1.0 } else { 0.0 })?;
        }
        Ok(())
    }

    fn text(self) -> Result<String, MetricsError> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

/// The exposition of `all`, with the failover history drawn from `events` (a target's log).
pub fn render(all: &Everything, events: &[Event]) -> Result<String, MetricsError> {
    let mut x = Exposition::new()?;
    x.gauge(
        "build_info",
        "The doppel build serving these metrics (always 1).",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    )?;
    for row in &all.jobs {
        job_row(&mut x, row)?;
    }
    for r in &all.replicas {
        replica(&mut x, r)?;
    }
    for s in &all.sources {
        let replicas: Vec<&ReplicaStatus> = all.replicas.iter().filter(|r| r.source == s.source).collect();
        source(&mut x, s, &replicas, events)?;
    }
    x.text()
}

fn job_row(x: &mut Exposition, row: &JobRow) -> Result<(), MetricsError> {
    let (name, state, connected) = match row {
        JobRow::Running(j) => (&j.job, j.state.as_str(), j.connected),
        JobRow::Receiving(j) => (&j.job, j.state.as_str(), j.connected),
        JobRow::NotAnswering(j) => (&j.job, j.state, j.connected),
        JobRow::Stopped(j) => (&j.job, j.state, j.connected),
    };
    let l = [("doppel_job", name.as_str())];
    x.states("job_state", "The step the job is at (1 for the current one).", &l, &JOB_STATES, state)?;
    x.gauge("job_connected", "1 while the job is connected to its target.", &l, flag(connected))?;
    match row {
        JobRow::Running(j) => running_job(x, j),
        JobRow::Stopped(j) => x.gauge(
            "job_last_acknowledged_sequence",
            "The last op sequence the target acknowledged (made durable).",
            &l,
            j.last_acked_seq as f64,
        ),
        _ => Ok(()),
    }
}

fn running_job(x: &mut Exposition, j: &JobStatusSnapshot) -> Result<(), MetricsError> {
    let l = [("doppel_job", j.job.as_str())];
    let lc = [("doppel_job", j.job.as_str()), ("capture", j.capture.as_str())];
    x.gauge("job_capture_info", "The job's capture mode (always 1).", &lc, 1.0)?;
    x.gauge(
        "job_lag_seconds",
        "Age of the oldest change not yet acknowledged by the target.",
        &l,
        j.lag_seconds,
    )?;
    x.gauge(
        "job_pending_bytes",
        "Bytes of captured changes waiting for an acknowledgement.",
        &l,
        j.pending_bytes as f64,
    )?;
    x.gauge(
        "job_spooled_bytes",
        "Bytes of pending changes spilled to the disk spool.",
        &l,
        j.spooled_bytes as f64,
    )?;
    x.gauge("job_last_captured_sequence", "The last op sequence captured.", &l, j.last_captured_seq as f64)?;
    x.gauge(
        "job_last_acknowledged_sequence",
        "The last op sequence the target acknowledged (made durable).",
        &l,
        j.last_acked_seq as f64,
    )?;
    if let Some(t) = j.last_acked_unix {
        x.gauge("job_last_acknowledged_timestamp_seconds", "When the target last acknowledged ops.", &l, t)?;
    }
    x.counter(
        "job_sent_bytes_total",
        "Bytes sent on the link since the agent started.",
        &l,
        j.bytes_sent as f64,
    )?;
    x.counter(
        "job_received_bytes_total",
        "Bytes received on the link since the agent started.",
        &l,
        j.bytes_received as f64,
    )?;
    x.counter("job_resent_bytes_total", "Bytes sent again after reconnects.", &l, j.bytes_resent as f64)?;
    x.counter("job_refused_ops_total", "Ops the target refused.", &l, j.refused_ops as f64)?;
    x.counter("job_connections_total", "Connections made to the target.", &l, j.connections as f64)?;
    x.counter(
        "job_hashed_files_total",
        "Files compared by block hashes (mirror, verify).",
        &l,
        j.files_hashed as f64,
    )?;
    x.counter(
        "job_hashed_bytes_total",
        "Bytes compared by block hashes (mirror, verify).",
        &l,
        j.bytes_hashed as f64,
    )?;
    x.gauge("job_sync_enabled", "1 when the job runs in sync mode.", &l, flag(j.sync != "off"))?;
    x.gauge(
        "job_sync_degraded",
        "1 while sync mode gave up waiting for the target (writes are not held).",
        &l,
        flag(j.sync == "degraded"),
    )?;
    x.gauge(
        "job_dirty_regions",
        "Regions that may differ from the replica until acknowledged.",
        &l,
        j.dirty_regions as f64,
    )?;
    x.gauge(
        "job_index_entries",
        "Names in the job's index (at its last checkpoint).",
        &l,
        j.index_entries as f64,
    )?;
    x.gauge("job_index_disk_bytes", "Size of the job's index store on disk.", &l, j.index_disk_bytes as f64)?;
    x.gauge(
        "job_index_cache_bytes",
        "The most memory the job's index cache may use.",
        &l,
        j.index_cache_bytes as f64,
    )?;
    x.gauge("job_window_bytes", "Bytes allowed in flight.", &l, j.window_bytes as f64)?;
    x.gauge(
        "job_ack_latency_seconds",
        "Smoothed time from sending a batch to its acknowledgement.",
        &l,
        j.ack_latency_ms / 1000.0,
    )?;
    x.gauge(
        "job_bandwidth_limit_bytes_per_second",
        "The bandwidth limit in force (0: unlimited).",
        &l,
        j.rate_limit as f64,
    )?;
    if let Some(h) = &j.history {
        history(x, "job", &l, h)?;
    }
    Ok(())
}

/// The history metrics of a job (`kind` `job`) or a replica (`replica`).
fn history(x: &mut Exposition, kind: &str, l: Labels, h: &HistoryStatus) -> Result<(), MetricsError> {
    let (bytes, window, oldest, paused) = if kind == "job" {
        (
            "job_history_bytes",
            "job_history_window_seconds",
            "job_history_oldest_timestamp_seconds",
            "job_history_paused",
        )
    } else {
        (
            "replica_history_bytes",
            "replica_history_window_seconds",
            "replica_history_oldest_timestamp_seconds",
            "replica_history_paused",
        )
    };
    x.gauge(bytes, "Bytes the point-in-time history takes.", l, h.bytes as f64)?;
    if h.oldest_point.is_some() {
        let now = doppel_link::framed::now_us();
        let span = now.saturating_sub(h.oldest_time_us) as f64 / 1e6;
        x.gauge(window, "How far back the history reaches now.", l, span)?;
        x.gauge(oldest, "The oldest moment the history can restore.", l, h.oldest_time_us as f64 / 1e6)?;
    }
    x.gauge(paused, "1 while space ran out with only the minimum window left.", l, flag(h.paused))
}

fn replica_state(s: &ReplicaState) -> &'static str {
    match s {
        ReplicaState::Unseen => "unseen",
        ReplicaState::Replicating => "replicating",
        ReplicaState::Paused(_) => "paused",
        ReplicaState::Stopped => "stopped",
        ReplicaState::Disconnected => "disconnected",
    }
}

fn replica(x: &mut Exposition, r: &ReplicaStatus) -> Result<(), MetricsError> {
    let l = [("source", r.source.as_str()), ("doppel_job", r.job.as_str())];
    let state = replica_state(&r.state);
    x.states(
        "replica_state",
        "What the replica is doing (1 for the current state).",
        &l,
        &REPLICA_STATES,
        state,
    )?;
    x.gauge("replica_connected", "1 while the source's job is connected.", &l, flag(r.connected))?;
    x.gauge("replica_applied_sequence", "The last op sequence applied.", &l, r.applied as f64)?;
    x.gauge("replica_durable_sequence", "The last op sequence made durable.", &l, r.durable as f64)?;
    if let Some(lag) = r.apply_lag_seconds {
        x.gauge(
            "replica_apply_lag_seconds",
            "From capture on the source to apply here, of the last op applied (clock skew included).",
            &l,
            lag,
        )?;
    }
    if let Some(t) = r.last_applied_unix {
        x.gauge("replica_last_applied_timestamp_seconds", "When ops were last applied.", &l, t)?;
    }
    if let Some(s) = r.last_seen_secs {
        x.gauge("replica_silent_seconds", "Seconds since the source was last heard from.", &l, s as f64)?;
    }
    x.counter(
        "replica_received_bytes_total",
        "Bytes received from the source.",
        &l,
        r.bytes_received as f64,
    )?;
    x.counter(
        "replica_refused_ops_total",
        "Ops refused (hostile, impossible or against policy).",
        &l,
        r.refused as f64,
    )?;
    x.counter(
        "replica_fenced_refusals_total",
        "Connections of the fenced source refused after a failover.",
        &l,
        r.fenced_refusals as f64,
    )?;
    x.gauge(
        "replica_unreplicated_names",
        "Names the source has that the replica does not (refused: device nodes the policy refuses, say).",
        &l,
        r.unreplicated_count as f64,
    )?;
    x.gauge("replica_epoch", "The replica's epoch (bumped by each failover).", &l, r.epoch as f64)?;
    x.gauge("replica_failed_over", "1 while the workload runs on this replica.", &l, flag(r.failed_over))?;
    if let Some(h) = &r.history {
        history(x, "replica", &l, h)?;
    }
    Ok(())
}

fn source(
    x: &mut Exposition,
    s: &SourceRow,
    replicas: &[&ReplicaStatus],
    events: &[Event],
) -> Result<(), MetricsError> {
    let l = [("source", s.source.as_str())];
    let state =
        serde_json::to_value(s.state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    x.states("source_state", "The source's state (1 for the current one).", &l, &SOURCE_STATES, &state)?;
    x.gauge(
        "source_failover_auto",
        "1 when the source fails over by itself, 0 when an operator decides.",
        &l,
        flag(s.policy == doppel_failover::Policy::Auto),
    )?;
    x.gauge("source_silent_seconds", "Seconds since the source was last heard from.", &l, s.silent_secs)?;
    x.gauge("source_missed_checks", "Checks missed in a row.", &l, s.missed as f64)?;
    if let Some(c) = s.failover_in_secs {
        x.gauge(
            "source_failover_countdown_seconds",
            "Seconds until the silent source counts as failed.",
            &l,
            c,
        )?;
    }
    x.gauge(
        "source_test_failover_running",
        "1 while a test failover of the source runs.",
        &l,
        flag(s.test.is_some()),
    )?;
    if let Some(q) = replicas.iter().find_map(|r| r.quota.as_ref()) {
        let over = replicas.iter().any(|r| r.over_quota().is_some());
        source_quota(x, &l, q, over)?;
    }
    let done: Vec<&Event> =
        events.iter().filter(|e| e.source == s.source && e.kind == "failover-done").collect();
    x.counter(
        "source_failovers_total",
        "Failovers completed (as the event log records them).",
        &l,
        done.len() as f64,
    )?;
    if let Some(last) = done.last() {
        x.gauge(
            "source_last_failover_timestamp_seconds",
            "When the last failover completed.",
            &l,
            last.time_us as f64 / 1e6,
        )?;
        if let Some(ms) = last.millis {
            x.gauge(
                "source_last_failover_recovery_seconds",
                "How long the last failover took, from its start to the workload running.",
                &l,
                ms as f64 / 1000.0,
            )?;
        }
    }
    Ok(())
}

fn source_quota(
    x: &mut Exposition,
    l: Labels,
    q: &doppel_target::QuotaUse,
    over: bool,
) -> Result<(), MetricsError> {
    let pairs = [
        (q.used_bytes, "source_quota_used_bytes", "Bytes the source's replicas take against its quota."),
        (q.quota_bytes, "source_quota_limit_bytes", "The source's quota in bytes."),
        (q.used_files, "source_quota_used_files", "Files the source's replicas take against its quota."),
        (q.quota_files, "source_quota_limit_files", "The source's quota in files."),
    ];
    for (v, name, help) in pairs {
        if let Some(v) = v {
            x.gauge(name, help, l, v as f64)?;
        }
    }
    x.gauge(
        "source_over_quota",
        "1 while the source has reached its quota (its writes are refused).",
        l,
        flag(over),
    )
}

#[cfg(test)]
mod tests;
