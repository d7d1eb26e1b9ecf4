//! `doppel failover`, `doppel failback` and `doppel events`: clients of the target's control
//! socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};

use crate::cli::{EventsArgs, FailoverArgs, TestFailoverArgs};
use crate::control::{self, ControlRequest, ControlResponse};

/// Scripts may start virtual machines or databases: the command waits as long as they may run.
const LONG: Duration = Duration::from_secs(6 * 3600);

/// The control socket of the target running with `home`.
pub(super) fn target_socket(home: &Path) -> Result<PathBuf> {
    let sock = control::run_dir(home).join("target.sock");
    if !sock.exists() {
        bail!("no target is running with home {}: start `doppel target` first", home.display());
    }
    Ok(sock)
}

/// `doppel failover` (`back` false) and `doppel failback` (`back` true).
pub fn run(a: FailoverArgs, back: bool, home: &Path) -> Result<()> {
    let sock = target_socket(home)?;
    let (source, jobs) = (a.source.clone(), a.jobs.clone());
    let req = if back {
        if a.at.is_some() || a.force {
            bail!("--at and --force are for failover: a failback hands back the replica as it is");
        }
        ControlRequest::Failback { source, jobs }
    } else {
        ControlRequest::Failover { source, jobs, at: a.at.clone(), force: a.force }
    };
    let cmd = req.op();
    // Not "started": the target may refuse it (an unknown source, a run already under way).
    eprintln!("{cmd} of {}: asking the target; it logs each step (`doppel events`)", a.source);
    let report = match control::call(&sock, &req, LONG)? {
        ControlResponse::Report(r) => r,
        ControlResponse::Error { message } => bail!("{cmd} of {}: {message}", a.source),
        other => bail!("the target gave no report: {other:?}"),
    };
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&serde_json::to_value(&report)?)?)?;
        return Ok(());
    }
    outln!("{}", doppel_failover::render(&report))?;
    Ok(())
}

/// `doppel test-failover`.
pub fn test(a: TestFailoverArgs, home: &Path) -> Result<()> {
    let sock = target_socket(home)?;
    let req = ControlRequest::TestFailover {
        source: a.source.clone(),
        jobs: a.jobs.clone(),
        at: a.at.clone(),
        end: a.end,
    };
    let (test, ended) = match control::call(&sock, &req, LONG)? {
        ControlResponse::Test { test, ended } => (test, ended),
        ControlResponse::Error { message } => bail!("test failover of {}: {message}", a.source),
        other => bail!("the target gave no answer on the test: {other:?}"),
    };
    if a.json {
        let v = match &test {
            Some(t) => serde_json::to_value(t)?,
            None => serde_json::json!({"source": a.source, "jobs": []}),
        };
        outln!("{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    match (test, ended) {
        (None, _) => outln!("no test failover of {} is running", a.source)?,
        (Some(t), true) => outln!("test failover of {} ended: {} views discarded", t.source, t.jobs.len())?,
        (Some(t), false) => {
            outln!(
                "test failover of {} running (end it with `doppel test-failover {} --end`):",
                t.source,
                t.source
            )?;
            for j in &t.jobs {
                outln!(
                    "  {}: {}  (seq:{}, {}, {})",
                    j.job,
                    j.view.display(),
                    j.point.seq,
                    j.point.time,
                    j.point.kind
                )?;
            }
        }
    }
    Ok(())
}

/// `doppel events`.
pub fn events(a: EventsArgs, home: &Path) -> Result<()> {
    let sock = target_socket(home)?;
    let mut events = match control::call(&sock, &ControlRequest::Events, Duration::from_secs(30))? {
        ControlResponse::Events { events } => events,
        ControlResponse::Error { message } => bail!("events: {message}"),
        other => bail!("events: the target gave no events: {other:?}"),
    };
    if let Some(s) = &a.source {
        events.retain(|e| &e.source == s);
    }
    if let Some(n) = a.last {
        let skip = events.len().saturating_sub(n);
        events.drain(..skip);
    }
    for e in &events {
        if a.json {
            outln!("{}", serde_json::to_string(e)?)?;
        } else {
            outln!("{}", render_event(e))?;
        }
    }
    Ok(())
}

fn render_event(e: &doppel_failover::Event) -> String {
    let secs = (e.time_us / 1_000_000) as i64;
    let time = time_of_day(secs, e.time_us % 1_000_000 / 1000);
    let mut line = format!("{time}  {:<10} {:<18}", e.source, e.kind);
    if let Some(step) = &e.step {
        line.push_str(&format!(" {step}"));
        if let Some(st) = &e.status {
            line.push_str(&format!(" {st}"));
        }
    }
    if let Some(j) = &e.job {
        line.push_str(&format!(" [{j}]"));
    }
    if let Some(ms) = e.millis {
        line.push_str(&format!(" {ms} ms"));
    }
    if !e.detail.is_empty() {
        line.push_str(&format!("  {}", e.detail));
    }
    line
}

/// `YYYY-MM-DD HH:MM:SS.mmm` in UTC.
fn time_of_day(secs: i64, millis: u64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{millis:03}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn event_times_read_as_utc() {
        assert_eq!(super::time_of_day(0, 0), "1970-01-01 00:00:00.000");
        assert_eq!(super::time_of_day(1_795_000_000, 7), "2026-11-18 11:06:40.007");
    }
}
