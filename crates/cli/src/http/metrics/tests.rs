//! The exposition of a target's and an agent's status.

use serde_json::json;

use super::*;
use crate::overview::StoppedJob;

fn everything() -> Everything {
    let job: JobStatusSnapshot = serde_json::from_value(json!({
        "job": "db", "root": "/srv/db", "dest": "dr:7340", "state": "replicating", "detail": "",
        "connected": true, "capture": "fuse", "last_captured_seq": 120, "last_acked_seq": 118,
        "last_acked_unix": 1_764_867_960.5, "pending_bytes": 4096, "spooled_bytes": 0,
        "lag_seconds": 0.25, "bytes_sent": 1_000_000, "bytes_received": 2_000, "refused_ops": 1,
        "connections": 2, "sync": "degraded", "dirty_regions": 3, "compression_level": 3,
        "window_bytes": 1_048_576, "ack_latency_ms": 12.5, "bytes_resent": 512, "rate_limit": 0,
        "files_hashed": 10, "bytes_hashed": 40_960,
        "history": { "oldest_point": 3, "oldest_time_us": 1_764_867_000_000_000u64, "newest_seq": 118,
                     "bytes": 65_536, "keep_secs": 86_400, "cut_below_keep": false, "paused": false }
    }))
    .unwrap();
    let replica: ReplicaStatus = serde_json::from_value(json!({
        "source": "web1", "job": "www", "connected": true, "state": "paused: no space left on device",
        "applied": 50, "durable": 49, "bytes_received": 9_000, "refused": 0, "last_seen_secs": 1,
        "last_applied_unix": 1_764_867_961.0, "apply_lag_seconds": 0.04, "epoch": 2,
        "failed_over": false, "fenced_refusals": 0,
        "quota": { "used_bytes": 1024, "used_files": 3, "quota_bytes": 1024, "quota_files": null }
    }))
    .unwrap();
    let source: SourceRow = serde_json::from_value(json!({
        "source": "web1", "policy": "auto", "state": "silent", "silent_secs": 4.5,
        "failover_in_secs": 25.5, "missed": 1, "threshold": 3, "error": null,
        "jobs": [{ "job": "www", "failed_over": false, "epoch": 2, "failback": null }]
    }))
    .unwrap();
    let stopped = JobRow::Stopped(StoppedJob {
        job: "old".into(),
        state: "fenced",
        last_acked_seq: 7,
        connected: false,
        detail: None,
    });
    Everything {
        jobs: vec![JobRow::Running(Box::new(job)), stopped],
        replicas: vec![replica],
        sources: vec![source],
        ..Everything::default()
    }
}

fn events() -> Vec<Event> {
    let mut done = Event::new("web1", "failover-done");
    done.time_us = 1_764_000_000_000_000;
    done.millis = Some(4_250);
    let mut other = Event::new("web2", "failover-done");
    other.millis = Some(1);
    vec![Event::new("web1", "failover-started"), done, other]
}

/// The value of the one series `name{labels}` in `text`.
fn value(text: &str, series: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"));
    line[series.len()..].trim().parse().unwrap()
}

#[test]
fn every_part_of_the_status_is_exposed() {
    let text = render(&everything(), &events()).unwrap();
    let v = |s: &str| value(&text, s);
    assert_eq!(v(r#"doppel_job_lag_seconds{doppel_job="db"}"#), 0.25);
    assert_eq!(v(r#"doppel_job_state{doppel_job="db",state="replicating"}"#), 1.0);
    assert_eq!(v(r#"doppel_job_state{doppel_job="db",state="disconnected"}"#), 0.0);
    assert_eq!(v(r#"doppel_job_state{doppel_job="old",state="fenced"}"#), 1.0);
    assert_eq!(v(r#"doppel_job_last_acknowledged_sequence{doppel_job="old"}"#), 7.0);
    assert_eq!(v(r#"doppel_job_capture_info{capture="fuse",doppel_job="db"}"#), 1.0);
    assert_eq!(v(r#"doppel_job_sent_bytes_total{doppel_job="db"}"#), 1e6);
    assert_eq!(v(r#"doppel_job_resent_bytes_total{doppel_job="db"}"#), 512.0);
    assert_eq!(v(r#"doppel_job_sync_degraded{doppel_job="db"}"#), 1.0);
    assert_eq!(v(r#"doppel_job_ack_latency_seconds{doppel_job="db"}"#), 0.0125);
    assert_eq!(v(r#"doppel_job_last_acknowledged_timestamp_seconds{doppel_job="db"}"#), 1_764_867_960.5);
    assert_eq!(v(r#"doppel_job_history_bytes{doppel_job="db"}"#), 65_536.0);
    assert_eq!(v(r#"doppel_job_history_oldest_timestamp_seconds{doppel_job="db"}"#), 1_764_867_000.0);
    assert_eq!(v(r#"doppel_replica_state{doppel_job="www",source="web1",state="paused"}"#), 1.0);
    assert_eq!(v(r#"doppel_replica_apply_lag_seconds{doppel_job="www",source="web1"}"#), 0.04);
    assert_eq!(v(r#"doppel_replica_durable_sequence{doppel_job="www",source="web1"}"#), 49.0);
    assert_eq!(v(r#"doppel_source_state{source="web1",state="silent"}"#), 1.0);
    assert_eq!(v(r#"doppel_source_state{source="web1",state="failed-over"}"#), 0.0);
    assert_eq!(v(r#"doppel_source_failover_countdown_seconds{source="web1"}"#), 25.5);
    assert_eq!(v(r#"doppel_source_failover_auto{source="web1"}"#), 1.0);
    assert_eq!(v(r#"doppel_source_over_quota{source="web1"}"#), 1.0);
    assert_eq!(v(r#"doppel_source_quota_limit_bytes{source="web1"}"#), 1024.0);
    assert_eq!(v(r#"doppel_source_failovers_total{source="web1"}"#), 1.0);
    assert_eq!(v(r#"doppel_source_last_failover_recovery_seconds{source="web1"}"#), 4.25);
    assert_eq!(v(r#"doppel_source_last_failover_timestamp_seconds{source="web1"}"#), 1_764_000_000.0);
    assert!(!text.contains("source_quota_limit_files"), "no files quota, no series:\n{text}");
}

/// Prometheus' conventions: counters and only counters end in `_total`, no `job` or
/// `instance` label, every family has help.
#[test]
fn names_follow_the_conventions() {
    let text = render(&everything(), &events()).unwrap();
    let mut families = 0;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            families += 1;
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(name.starts_with("doppel_"), "{line}");
            assert_eq!(name.ends_with("_total"), kind == "counter", "{line}");
            assert!(text.contains(&format!("# HELP {name} ")), "{name} has no help");
        } else if !line.starts_with('#') {
            assert!(!line.contains("{job=") && !line.contains(",job="), "{line}");
            assert!(!line.contains("instance="), "{line}");
        }
    }
    assert!(families > 40, "{families} families:\n{text}");
}

/// `promtool check metrics` (Prometheus' own linter) accepts the exposition.
#[test]
fn promtool_accepts_the_exposition() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        doppel_testkit::skip::skip_or_fail("promtool (Debian package prometheus) is not installed");
        return;
    };
    let text = render(&everything(), &events()).unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}\n{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
