//! The notify command of `doppel protect` (`--notify`, `notify` in the config): told when a
//! job's lag passes its recovery point objective, its link to the target is down, or sync
//! mode degrades, for administrators without Prometheus. The decisions are
//! [`doppel_failover::alerts`]'s; this loop feeds it the jobs' status once a second and runs
//! the command (with `DOPPEL_JOB`, `DOPPEL_EVENT`, `DOPPEL_DETAIL`) without waiting for it.

use std::time::Duration;

use doppel_agent::{JobStatusSnapshot, StatusSource};
use doppel_failover::alerts::{AlertTiming, Alerts, Condition};
use tokio_util::sync::CancellationToken;

/// How often the jobs are looked at.
const EVERY: Duration = Duration::from_secs(1);

/// The longest a notify command may run.
const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// What `--notify`, `--rpo` and `alert_after_secs` ask for.
#[derive(Debug, Clone)]
pub struct NoticeOptions {
    /// The command (through `/bin/sh -c`).
    pub command: String,
    /// The recovery point objective (`None`: lag is not watched).
    pub rpo: Option<Duration>,
    /// When notices go out.
    pub timing: AlertTiming,
}

/// The conditions of one job, with their details.
fn conditions(j: &JobStatusSnapshot, rpo: Option<Duration>) -> [(Condition, bool, String); 3] {
    let late = rpo.is_some_and(|r| j.lag_seconds > r.as_secs_f64());
    [
        (
            Condition::Lag,
            late,
            format!("replication lag {:.1} s, above the RPO of {:?}", j.lag_seconds, rpo.unwrap_or_default()),
        ),
        (
            Condition::Disconnected,
            j.state == "disconnected",
            format!("the link to {} is down: {}", j.dest, j.detail),
        ),
        (
            Condition::SyncDegraded,
            j.sync == "degraded",
            "sync mode gave up waiting for the target: fsync no longer waits for it".to_string(),
        ),
    ]
}

/// Watches `jobs` until `stop`.
pub async fn watch(jobs: Vec<StatusSource>, opts: NoticeOptions, stop: CancellationToken) {
    let mut alerts = Alerts::new(opts.timing);
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = doppel_link::framed::now_us();
        for src in &jobs {
            let j = src.snapshot();
            for (condition, holds, detail) in conditions(&j, opts.rpo) {
                if let Some(n) = alerts.observe(now, &j.job, condition, holds) {
                    let detail = if n.raised { detail } else { String::new() };
                    send(&opts.command, &j.job, n.event, detail);
                }
            }
        }
    }
}

/// Runs the command for one notice, in the background.
fn send(command: &str, job: &str, event: &'static str, detail: String) {
    tracing::warn!(job, event, detail = %detail, "notifying");
    let env = vec![
        ("DOPPEL_JOB".to_string(), job.to_string()),
        ("DOPPEL_EVENT".to_string(), event.to_string()),
        ("DOPPEL_DETAIL".to_string(), detail),
    ];
    let (command, job) = (command.to_string(), job.to_string());
    tokio::spawn(async move {
        if let Err(e) = doppel_failover::hooks::run_script(&command, &env, COMMAND_LIMIT).await {
            tracing::error!(job, event, "notify command failed: {e}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: &str, lag: f64, sync: &str) -> JobStatusSnapshot {
        serde_json::from_value(serde_json::json!({
            "job": "db", "root": "/srv/db", "dest": "dr:7340", "state": state, "detail": "connection refused",
            "connected": state != "disconnected", "capture": "fuse", "last_captured_seq": 1, "last_acked_seq": 1,
            "pending_bytes": 0, "spooled_bytes": 0, "lag_seconds": lag, "bytes_sent": 0, "bytes_received": 0,
            "refused_ops": 0, "connections": 1, "sync": sync, "dirty_regions": 0, "compression_level": 0,
            "window_bytes": 0, "ack_latency_ms": 0.0, "bytes_resent": 0, "rate_limit": 0, "files_hashed": 0,
            "bytes_hashed": 0
        }))
        .unwrap()
    }

    fn holding(j: &JobStatusSnapshot, rpo: Option<Duration>) -> Vec<Condition> {
        conditions(j, rpo).into_iter().filter(|c| c.1).map(|c| c.0).collect()
    }

    #[test]
    fn each_condition_is_read_from_the_status() {
        let rpo = Some(Duration::from_secs(30));
        assert_eq!(holding(&job("replicating", 29.0, "on"), rpo), vec![]);
        assert_eq!(holding(&job("replicating", 31.0, "on"), rpo), vec![Condition::Lag]);
        assert_eq!(holding(&job("replicating", 3100.0, "off"), None), vec![], "no RPO, no lag notice");
        let down = job("disconnected", 45.0, "degraded");
        assert_eq!(
            holding(&down, rpo),
            vec![Condition::Lag, Condition::Disconnected, Condition::SyncDegraded]
        );
        let detail = &conditions(&down, rpo)[1].2;
        assert_eq!(detail, "the link to dr:7340 is down: connection refused");
    }
}
