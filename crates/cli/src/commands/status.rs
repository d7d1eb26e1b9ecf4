//! `doppel status`, `doppel verify` and `doppel limit`: clients of the control sockets.
//!
//! What `status` shows is gathered by [`crate::overview`], which the HTTP API serves too.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use doppel_agent::JobStatusSnapshot;
use doppel_target::ReplicaStatus;

use crate::cli::{LimitArgs, StatusArgs, VerifyArgs};
use crate::control::{self, ControlRequest, ControlResponse, SourceRow};
use crate::overview::JobRow;

/// The columns of the jobs table; `None` prints as `-`.
struct JobLine<'a> {
    job: &'a str,
    state: &'a str,
    captured: Option<u64>,
    acked: Option<u64>,
    pending: Option<u64>,
    lag: Option<f64>,
    dest: Option<&'a str>,
    notes: Vec<String>,
    detail: Option<&'a str>,
}

impl JobRow {
    fn line(&self) -> JobLine<'_> {
        let blank = |job, state, acked, dest, detail| JobLine {
            job,
            state,
            captured: None,
            acked,
            pending: None,
            lag: None,
            dest,
            notes: Vec::new(),
            detail,
        };
        match self {
            JobRow::Running(j) => JobLine {
                job: &j.job,
                state: &j.state,
                captured: Some(j.last_captured_seq),
                acked: Some(j.last_acked_seq),
                pending: Some(j.pending_bytes),
                lag: Some(j.lag_seconds),
                dest: Some(&j.dest),
                notes: notes(j),
                detail: Some(&j.detail),
            },
            JobRow::Receiving(j) => blank(&j.job, &j.state, None, Some(&j.dest), Some(&j.detail)),
            JobRow::NotAnswering(j) => blank(&j.job, j.state, None, None, Some(&j.detail)),
            JobRow::Stopped(j) => blank(&j.job, j.state, Some(j.last_acked_seq), None, j.detail.as_deref()),
        }
    }
}

/// The notes line under a running job.
fn notes(j: &JobStatusSnapshot) -> Vec<String> {
    let mut notes = Vec::new();
    if !j.capture.is_empty() {
        notes.push(format!("capture {}", j.capture));
    }
    match j.sync.as_str() {
        "on" => notes.push("sync".into()),
        "degraded" => notes.push("SYNC DEGRADED: fsync no longer waits for the target".into()),
        _ => {}
    }
    if j.dirty_regions > 0 {
        notes.push(format!("{} dirty regions", j.dirty_regions));
    }
    if j.rate_limit > 0 {
        notes.push(format!("limit {}", doppel_link::ratelimit::format_rate(j.rate_limit)));
    }
    if j.index_disk_bytes > 0 {
        notes.push(format!(
            "index {} names, {} on disk, cache {}",
            crate::progress::thousands(j.index_entries),
            indicatif::BinaryBytes(j.index_disk_bytes),
            indicatif::BinaryBytes(j.index_cache_bytes)
        ));
    }
    if let Some(bytes) = j.mirror_done_bytes {
        use crate::progress::Counts;
        let done = Counts::new(j.mirror_done_files.unwrap_or(0), bytes);
        let total = j.mirror_total_files.zip(j.mirror_total_bytes).map(|(f, b)| Counts::new(f, b));
        notes.push(crate::progress::compared(done, total));
    }
    notes
}

pub fn run(a: StatusArgs, home: &Path) -> Result<()> {
    let all = crate::overview::gather(home);
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&serde_json::to_value(&all)?)?)?;
        return Ok(());
    }
    if all.replicas.is_empty()
        && let Some(line) = stopped_target(home)
    {
        // The DR side during an incident: the target is down, its replicas are still there.
        outln!("{line}")?;
        if all.jobs.is_empty() && all.sources.is_empty() {
            return Ok(());
        }
        outln!()?;
    }
    if all.jobs.is_empty() && all.replicas.is_empty() && all.sources.is_empty() {
        outln!("no jobs or replicas under {}", home.display())?;
        return Ok(());
    }
    print_jobs(&all.jobs)?;
    if !all.replicas.is_empty() {
        if !all.jobs.is_empty() {
            outln!()?;
        }
        print_replicas(&all.replicas)?;
    }
    if !all.sources.is_empty() {
        outln!()?;
        print_sources(&all.sources)?;
    }
    Ok(())
}

/// For a home whose target is not running (nothing listens on its control socket), where it keeps its data and the
/// replicas there (`SOURCE/JOB`), read from disk; `None` when the home never ran a target.
fn stopped_target(home: &Path) -> Option<String> {
    let sock = crate::control::run_dir(home).join("target.sock");
    if std::os::unix::net::UnixStream::connect(sock).is_ok() {
        return None;
    }
    let data = super::history::noted_data_dir(home)?;
    let mut replicas = Vec::new();
    for source in std::fs::read_dir(data.join("replicas")).into_iter().flatten().flatten() {
        for job in std::fs::read_dir(source.path()).into_iter().flatten().flatten() {
            replicas.push(format!(
                "{}/{}",
                source.file_name().to_string_lossy(),
                job.file_name().to_string_lossy()
            ));
        }
    }
    replicas.sort();
    let held = if replicas.is_empty() {
        "no replicas".to_string()
    } else {
        format!("replicas {}", replicas.join(", "))
    };
    Some(format!("TARGET: not running (data {}: {held})", data.display()))
}

fn print_jobs(jobs: &[JobRow]) -> Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    outln!(
        "{:<16} {:<13} {:>10} {:>10} {:>10} {:>8}  DESTINATION",
        "JOB",
        "STATE",
        "CAPTURED",
        "ACKED",
        "PENDING",
        "LAG"
    )?;
    for row in jobs {
        let j = row.line();
        outln!(
            "{:<16} {:<13} {:>10} {:>10} {:>10} {:>8}  {}",
            j.job,
            j.state,
            n(j.captured),
            n(j.acked),
            bytes(j.pending),
            j.lag.map(|l| format!("{l:.1}s")).unwrap_or_else(|| "-".into()),
            j.dest.unwrap_or("-"),
        )?;
        if !j.notes.is_empty() {
            outln!("{:<16} {}", "", j.notes.join(", "))?;
        }
        if let Some(detail) = j.detail.filter(|d| !d.is_empty() && *d != "-") {
            outln!("{:<16} {detail}", "")?;
        }
        if let JobRow::Running(s) = row
            && let Some(h) = &s.history
        {
            outln!("{:<16} {}", "", history_line(h))?;
        }
    }
    Ok(())
}

fn print_replicas(replicas: &[ReplicaStatus]) -> Result<()> {
    outln!(
        "{:<16} {:<16} {:<13} {:>10} {:>10} {:>10} {:>6}  SEEN",
        "SOURCE",
        "JOB",
        "STATE",
        "APPLIED",
        "DURABLE",
        "RECEIVED",
        "EPOCH"
    )?;
    for r in replicas {
        let state = if r.failed_over { "failed-over".into() } else { r.state.to_string() };
        outln!(
            "{:<16} {:<16} {:<13} {:>10} {:>10} {:>10} {:>6}  {}",
            r.source,
            r.job,
            state,
            r.applied,
            r.durable,
            bytes(Some(r.bytes_received)),
            r.epoch,
            r.last_seen_secs.map(|t| format!("{t}s ago")).unwrap_or_else(|| "never".into()),
        )?;
        if r.fenced_refusals > 0 {
            outln!("{:<16} FENCED: refused {} connections of the old source", "", r.fenced_refusals)?;
        }
        if let Some(line) = privilege_line(r) {
            outln!("{:<16} {line}", "")?;
        }
        if let Some(q) = &r.quota {
            outln!("{:<16} {}", "", quota_line(q))?;
        }
        if let Some(h) = &r.history {
            outln!("{:<16} {}", "", history_line(h))?;
        }
        if r.unreplicated_count > 0 {
            outln!("{:<16} NOT REPLICATED: {} names the source has:", "", r.unreplicated_count)?;
            for n in &r.unreplicated {
                outln!("{:<18} {}: {}", "", n.path, n.reason)?;
            }
            let more = r.unreplicated_count.saturating_sub(r.unreplicated.len() as u64);
            if more > 0 {
                outln!("{:<18} ... and {more} more", "")?;
            }
        }
    }
    Ok(())
}

/// A replica's history: `HISTORY: points 41 (2026-12-04T17:05:00Z) to 9120, 1.2 GiB`, with a
/// warning when the size limit cut the window below the time configured.
fn history_line(h: &doppel_apply::history::HistoryStatus) -> String {
    use doppel_apply::history::when::rfc3339;
    let mut line = match h.oldest_point {
        Some(p) => format!(
            "HISTORY: points {p} (up to {}) to {}, {} on disk",
            rfc3339(h.oldest_time_us),
            h.newest_seq,
            bytes(Some(h.bytes))
        ),
        None => "HISTORY: no points yet".to_string(),
    };
    if h.cut_below_keep {
        line.push_str(&format!(
            "; WARNING: the size limit cuts the window below the {} s configured",
            h.keep_secs
        ));
    }
    if h.paused {
        line.push_str("; PAUSED: out of space with only the minimum window left");
    }
    line
}

/// A source's use against its quota: `QUOTA: 1.2 GiB of 10.0 GiB, 5321 of 100000 files`.
fn quota_line(q: &doppel_target::QuotaUse) -> String {
    let of = |used: Option<u64>, limit: Option<u64>, show: &dyn Fn(Option<u64>) -> String| match limit {
        Some(_) => format!("{} of {}", show(used), show(limit)),
        None => format!("{} (no limit)", show(used)),
    };
    format!(
        "QUOTA (the source's replicas and their history together): {}, {} files",
        of(q.used_bytes, q.quota_bytes, &bytes),
        of(q.used_files, q.quota_files, &n)
    )
}

/// What the source's privilege policy did to this replica's ops, if anything:
/// `PRIVILEGES: stripped setid 2, owners 5; refused devices 1`.
fn privilege_line(r: &ReplicaStatus) -> Option<String> {
    let words = |c: &doppel_target::PrivilegeCounts| {
        doppel_target::Privilege::ALL
            .iter()
            .filter(|&&p| c.get(p) > 0)
            .map(|&p| format!("{p} {}", c.get(p)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let parts: Vec<String> = [("stripped", &r.stripped), ("refused", &r.policy_refused)]
        .into_iter()
        .filter(|(_, c)| !c.is_empty())
        .map(|(what, c)| format!("{what} {}", words(c)))
        .collect();
    (!parts.is_empty()).then(|| format!("PRIVILEGES: {}", parts.join("; ")))
}

fn print_sources(sources: &[SourceRow]) -> Result<()> {
    outln!("{:<16} {:<7} {:<13} {:>8} {:>7}  NEXT", "SOURCE", "POLICY", "STATE", "SILENT", "MISSED")?;
    for src in sources {
        use doppel_failover::{Policy, SourceState};
        let state = serde_json::to_value(src.state)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let policy = serde_json::to_value(src.policy)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let next = match (src.failover_in_secs, src.policy, src.state) {
            (Some(t), Policy::Auto, _) => format!("fails over in {t:.0}s"),
            (Some(t), _, _) => format!("counts as failed in {t:.0}s"),
            (None, Policy::Manual, SourceState::Failed) => {
                format!("manual policy: run `doppel failover {}`", src.source)
            }
            (None, _, SourceState::Silent) => "the link is silent but a probe answers: not failed".into(),
            (None, _, SourceState::FailedOver) => {
                format!("`doppel failback {}` once it is back", src.source)
            }
            _ => String::new(),
        };
        outln!(
            "{:<16} {:<7} {:<13} {:>7.0}s {:>3}/{:<3}  {next}",
            src.source,
            policy,
            state,
            src.silent_secs,
            src.missed,
            src.threshold,
        )?;
        if let Some(e) = &src.error {
            outln!("{:<16} ERROR: {}", "", e.replace('\n', " "))?;
        }
        if let Some(t) = &src.test {
            for j in &t.jobs {
                outln!(
                    "{:<16} TEST FAILOVER: {} at seq:{} ({}) in {}",
                    "",
                    j.job,
                    j.point.seq,
                    j.point.time,
                    j.view.display()
                )?;
            }
        }
        for j in &src.jobs {
            if let Some(fb) = &j.failback {
                outln!(
                    "{:<16} job {}: failback {} ({} sent, {} pending)",
                    "",
                    j.job,
                    fb.state,
                    bytes(Some(fb.bytes_sent)),
                    bytes(Some(fb.pending_bytes))
                )?;
            }
        }
    }
    Ok(())
}

/// The socket of `job`, which must be running.
pub(super) fn running_job(home: &Path, job: &str) -> Result<std::path::PathBuf> {
    let sock = control::job_socket(home, job);
    if !sock.exists() {
        bail!("job {job} is not running here: start it with `doppel protect` first");
    }
    Ok(sock)
}

pub fn verify(a: VerifyArgs, home: &Path) -> Result<()> {
    let sock = running_job(home, &a.job)?;
    let req = ControlRequest::Verify { repair: a.repair };
    // While the job compares, its status (on a second connection) tells how far it is.
    let done = std::sync::atomic::AtomicBool::new(false);
    let answer = std::thread::scope(|scope| {
        scope.spawn(|| crate::progress::watch_verify(&a.job, || job_status(&sock), &done));
        let answer = control::call(&sock, &req, Duration::from_secs(24 * 3600));
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        answer
    });
    let report = match answer? {
        ControlResponse::Verify(r) => r,
        ControlResponse::Error { message } => bail!("verify failed: {message}"),
        other => bail!("verify failed: unexpected answer {other:?}"),
    };
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&serde_json::to_value(&report)?)?)?;
    } else {
        for d in &report.differences {
            outln!("{}: {}", d.path, d.what)?;
        }
        for p in &report.unrepaired {
            outln!("{p}: cannot be repaired (nothing to send would change it)")?;
        }
        let compared = format!(
            "{} entries compared, {} read",
            crate::progress::thousands(report.entries_compared),
            doppel_target::iec(report.bytes_compared)
        );
        match (report.differences.len(), a.repair) {
            (0, _) => outln!("replica matches the source ({compared})")?,
            (n, true) if report.unrepaired.is_empty() => {
                outln!("{n} differences found and queued for repair ({compared})")?
            }
            (n, true) => outln!(
                "{n} differences found, {} queued for repair, {} cannot be repaired ({compared})",
                report.repaired.len(),
                report.unrepaired.len()
            )?,
            (n, false) => outln!("{n} differences found ({compared}); run with --repair to fix them")?,
        }
    }
    if !a.repair && !report.differences.is_empty() {
        return Err(anyhow!("replica differs from the source"));
    }
    if !report.unrepaired.is_empty() {
        return Err(anyhow!("{} differences cannot be repaired", report.unrepaired.len()));
    }
    Ok(())
}

/// The job's status from its control socket, if it answers.
fn job_status(sock: &Path) -> Option<JobStatusSnapshot> {
    match control::call(sock, &ControlRequest::Status, Duration::from_secs(5)) {
        Ok(ControlResponse::Status(r)) => r.jobs.into_iter().next(),
        _ => None,
    }
}

fn n(v: Option<u64>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

fn bytes(v: Option<u64>) -> String {
    v.map(doppel_target::iec).unwrap_or_else(|| "-".into())
}

pub fn limit(a: LimitArgs, home: &Path) -> Result<()> {
    let sock = running_job(home, &a.job)?;
    if a.rate != "schedule" {
        doppel_link::ratelimit::parse_rate(&a.rate).map_err(|e| anyhow!(e))?;
    }
    let req = ControlRequest::Limit { rate: a.rate.clone() };
    let rate = match control::call(&sock, &req, Duration::from_secs(10))? {
        ControlResponse::Limit { rate_limit } => rate_limit,
        ControlResponse::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer to limit: {other:?}"),
    };
    outln!("{}: bandwidth limit {}", a.job, doppel_link::ratelimit::format_rate(rate))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A replica's privilege counts show as one line, and only when a policy acted; a status
    /// from a target without the counts reads as none.
    #[test]
    fn privilege_counts_show_when_nonzero() {
        let old = json!({
            "source": "s", "job": "j", "connected": true, "state": "replicating", "applied": 3,
            "durable": 3, "bytes_received": 10, "refused": 1, "last_seen_secs": 0, "epoch": 1,
            "failed_over": false, "fenced_refusals": 0
        });
        let mut r: ReplicaStatus = serde_json::from_value(old).unwrap();
        assert_eq!(privilege_line(&r), None);
        r.stripped.setid = 2;
        r.stripped.owners = 5;
        r.policy_refused.devices = 1;
        assert_eq!(
            privilege_line(&r).as_deref(),
            Some("PRIVILEGES: stripped setid 2, owners 5; refused devices 1")
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["stripped"], json!({ "setid": 2, "owners": 5, "capabilities": 0, "devices": 0 }));
        assert_eq!(v["policy_refused"]["devices"], 1);
    }
}
