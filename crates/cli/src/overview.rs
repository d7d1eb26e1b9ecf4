//! What every doppel process under one home is doing: `doppel status --json` prints it, the HTTP
//! API serves it (`/api/status`), and the metrics are drawn from it, so the three never
//! disagree.
//!
//! Running processes are asked on their control sockets; jobs with no running process are
//! read from their state on disk (`stopped`, or `fenced` when the target refused them after a
//! failover).

use std::path::Path;
use std::time::Duration;

use doppel_agent::JobStatusSnapshot;
use doppel_target::ReplicaStatus;
use serde::Serialize;

use crate::control::{self, CallError, ControlRequest, ControlResponse, ReceivingJob, SourceRow};

/// The version of [`Everything`]'s shape, as `schema` in `status --json` and `/api/status`:
/// bumped when a field changes meaning or goes away (added fields do not bump it).
pub const SCHEMA: u32 = 1;

/// Everything under one home.
pub fn gather(home: &Path) -> Everything {
    let mut all = ask_running(home);
    add_stopped_jobs(home, &mut all.jobs);
    all
}

/// One line of the jobs table (and one element of `jobs` in `status --json`).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum JobRow {
    /// A running job, as its agent reports it.
    Running(Box<JobStatusSnapshot>),
    /// A job of `protect --failback` receiving its replica back.
    Receiving(ReceivingJob),
    /// A job whose process is there but did not answer.
    NotAnswering(NotAnswering),
    /// A job with state on disk and no running process.
    Stopped(StoppedJob),
}

/// See [`JobRow::NotAnswering`].
#[derive(Debug, Serialize)]
pub struct NotAnswering {
    pub job: String,
    pub state: &'static str,
    pub connected: bool,
    pub detail: String,
}

/// See [`JobRow::Stopped`].
#[derive(Debug, Serialize)]
pub struct StoppedJob {
    pub job: String,
    /// `stopped`, or `fenced`.
    pub state: &'static str,
    pub last_acked_seq: u64,
    pub connected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What `status --json` prints.
#[derive(Debug, Serialize)]
pub struct Everything {
    /// [`SCHEMA`].
    pub schema: u32,
    pub jobs: Vec<JobRow>,
    pub replicas: Vec<ReplicaStatus>,
    pub sources: Vec<SourceRow>,
}

impl Default for Everything {
    fn default() -> Everything {
        Everything { schema: SCHEMA, jobs: Vec::new(), replicas: Vec::new(), sources: Vec::new() }
    }
}

impl JobRow {
    /// The job's name.
    pub fn job(&self) -> &str {
        match self {
            JobRow::Running(j) => &j.job,
            JobRow::Receiving(j) => &j.job,
            JobRow::NotAnswering(j) => &j.job,
            JobRow::Stopped(j) => &j.job,
        }
    }
}

/// Asks every process with a socket under `home`. A socket nobody listens on was left by a
/// process that is gone: its jobs are read from disk. A process that is there but does not
/// answer (or speaks another protocol version) is reported as such, not read from disk
/// behind its back.
fn ask_running(home: &Path) -> Everything {
    let mut all = Everything::default();
    for sock in control::sockets(home) {
        match control::call(&sock, &ControlRequest::Status, Duration::from_secs(5)) {
            Ok(ControlResponse::Status(r)) => {
                all.jobs.extend(r.jobs.into_iter().map(|j| JobRow::Running(Box::new(j))));
                all.jobs.extend(r.receiving.into_iter().map(JobRow::Receiving));
                all.replicas.extend(r.replicas);
                all.sources.extend(r.sources);
            }
            Ok(ControlResponse::Error { message }) => not_answering(&mut all, &sock, message),
            Ok(other) => not_answering(&mut all, &sock, format!("unexpected answer to status: {other:?}")),
            Err(CallError::Unreachable { .. }) => {}
            Err(e) => not_answering(&mut all, &sock, e.to_string()),
        }
    }
    all
}

fn not_answering(all: &mut Everything, sock: &Path, why: String) {
    tracing::warn!("{why}");
    if let Some(job) = control::job_of_socket(sock) {
        all.jobs.push(JobRow::NotAnswering(NotAnswering {
            job,
            state: "not answering",
            connected: false,
            detail: why,
        }));
    }
}

/// Jobs with state on disk but no running agent.
fn add_stopped_jobs(home: &Path, jobs: &mut Vec<JobRow>) {
    let Ok(rd) = std::fs::read_dir(home.join("jobs")) else { return };
    let mut names: Vec<String> = rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    for name in names {
        if jobs.iter().any(|j| j.job() == name) {
            continue;
        }
        let dir = home.join("jobs").join(&name);
        let acked: u64 = std::fs::read_to_string(dir.join("spool/acked"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let fenced = doppel_agent::state::JobState::load(&dir.join("state.json")).ok().and_then(|s| s.fenced);
        let (state, detail) = match fenced {
            Some(epoch) => (
                "fenced",
                Some(format!(
                    "the target failed this job over (epoch {epoch}) and refuses it: run `doppel protect --failback` to take the workload back"
                )),
            ),
            None => ("stopped", None),
        };
        jobs.push(JobRow::Stopped(StoppedJob {
            job: name,
            state,
            last_acked_seq: acked,
            connected: false,
            detail,
        }));
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// `status --json` prints the rows as it did when they were built as untyped JSON.
    #[test]
    fn rows_print_as_before() {
        let stopped = JobRow::Stopped(StoppedJob {
            job: "a".into(),
            state: "stopped",
            last_acked_seq: 7,
            connected: false,
            detail: None,
        });
        assert_eq!(
            serde_json::to_value(&stopped).unwrap(),
            json!({ "job": "a", "state": "stopped", "last_acked_seq": 7, "connected": false })
        );
        let receiving = JobRow::Receiving(ReceivingJob::new("b", "dr:1"));
        assert_eq!(
            serde_json::to_value(&receiving).unwrap(),
            json!({
                "job": "b",
                "state": "failback",
                "connected": true,
                "dest": "dr:1",
                "detail": "receiving the replica; the job is handed back when `doppel failback` runs on the target",
            })
        );
        let all = Everything { jobs: vec![stopped], ..Everything::default() };
        let text = serde_json::to_string_pretty(&serde_json::to_value(&all).unwrap()).unwrap();
        let keys: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("  \"")).collect();
        assert_eq!(keys.len(), 4, "{text}");
        assert!(keys[0].starts_with("schema\": 1"), "{text}");
        assert!(
            keys[1].starts_with("jobs") && keys[2].starts_with("replicas") && keys[3].starts_with("sources")
        );
    }

    #[test]
    fn fenced_jobs_are_read_from_disk() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("jobs/data");
        std::fs::create_dir_all(dir.join("spool")).unwrap();
        std::fs::write(dir.join("spool/acked"), "12\n").unwrap();
        let state = doppel_agent::state::JobState { fenced: Some(4), ..Default::default() };
        state.save(&dir.join("state.json")).unwrap();
        std::fs::create_dir_all(home.path().join("jobs/other")).unwrap();
        let mut jobs = Vec::new();
        add_stopped_jobs(home.path(), &mut jobs);
        let v = serde_json::to_value(&jobs).unwrap();
        assert_eq!(v[0]["job"], "data");
        assert_eq!(v[0]["state"], "fenced");
        assert_eq!(v[0]["last_acked_seq"], 12);
        assert!(v[0]["detail"].as_str().unwrap().contains("epoch 4"), "{v}");
        assert_eq!(
            v[1],
            json!({ "job": "other", "state": "stopped", "last_acked_seq": 0, "connected": false })
        );
    }
}
