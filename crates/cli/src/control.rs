//! The local control socket of a running agent or target.
//!
//! Each running process listens on a Unix socket under `HOME/run/` (mode 0600: whoever can
//! read the node's state may ask). A request is one line of JSON, the answer is one line of
//! JSON. `doppel status`, `verify`, `limit`, `failover`, `failback`, `events` and `reload` are its
//! clients; so can be any monitoring script.
//!
//! Both directions are typed: a [`Request`] is a [`ControlRequest`] tagged by `op`, a
//! [`Response`] a [`ControlResponse`] tagged by `answer`, and both carry [`VERSION`], so that a
//! client and a process from different doppel binaries say so instead of misreading each
//! other. A request that cannot be read (malformed, another version, an unknown op) gets an
//! [`ControlResponse::Error`] naming the problem; the connection and the server go on.

use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use doppel_agent::JobStatusSnapshot;
use doppel_mirror::VerifyReport;
use doppel_target::ReplicaStatus;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// The control protocol's version: bumped whenever a request or an answer changes shape.
pub const VERSION: u32 = 1;

/// What a client asks a running process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// What the process is doing (jobs on an agent, replicas and sources on a target).
    Status,
    /// Compare the job's replica with its tree (agent).
    Verify {
        /// Queue the fixes of the differences found.
        repair: bool,
    },
    /// Set the job's bandwidth limit (agent): a rate, or `schedule` to return to the
    /// configured schedule.
    Limit {
        /// The rate as `doppel limit` takes it.
        rate: String,
    },
    /// Fail a source over to its replicas (target).
    Failover {
        /// The source.
        source: String,
        /// Only these jobs (all when empty).
        jobs: Vec<String>,
        /// The point to go back to (`--at WHEN`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<String>,
        /// Fail over even with no consistent point yet.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        force: bool,
    },
    /// Start (or, with `end`, end) a test failover of a source (target).
    TestFailover {
        /// The source.
        source: String,
        /// Only these jobs (all when empty).
        #[serde(default)]
        jobs: Vec<String>,
        /// The point (default: each job's latest consistent point).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<String>,
        /// End the running test instead.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        end: bool,
    },
    /// Put a bookmark into the job's op stream (agent).
    Bookmark {
        /// Its name.
        name: String,
    },
    /// Hand a failed-over source its jobs back (target).
    Failback {
        /// The source.
        source: String,
        /// Only these jobs (all when empty).
        jobs: Vec<String>,
    },
    /// The failover event log (target).
    Events,
    /// Re-read the configuration file (target).
    Reload,
}

impl ControlRequest {
    /// Every `op`, as it appears on the wire.
    pub const OPS: [&'static str; 9] = [
        "status",
        "verify",
        "limit",
        "failover",
        "failback",
        "events",
        "reload",
        "bookmark",
        "test_failover",
    ];

    /// This request's `op`.
    pub fn op(&self) -> &'static str {
        match self {
            ControlRequest::Status => "status",
            ControlRequest::Verify { .. } => "verify",
            ControlRequest::Limit { .. } => "limit",
            ControlRequest::Failover { .. } => "failover",
            ControlRequest::Failback { .. } => "failback",
            ControlRequest::Events => "events",
            ControlRequest::Reload => "reload",
            ControlRequest::Bookmark { .. } => "bookmark",
            ControlRequest::TestFailover { .. } => "test_failover",
        }
    }
}

/// A process's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum ControlResponse {
    /// To [`ControlRequest::Status`].
    Status(StatusReport),
    /// To [`ControlRequest::Verify`].
    Verify(VerifyReport),
    /// To [`ControlRequest::Limit`]: the limit now in force.
    Limit {
        /// Bytes per second (0: unlimited).
        rate_limit: u64,
    },
    /// To [`ControlRequest::Failover`] and [`ControlRequest::Failback`].
    Report(doppel_failover::Report),
    /// To [`ControlRequest::Events`].
    Events {
        /// The event log, oldest first.
        events: Vec<doppel_failover::Event>,
    },
    /// To [`ControlRequest::Reload`]: what changed, by source name.
    Reloaded {
        /// Newly allowed sources.
        added: Vec<String>,
        /// Sources no longer allowed (their sessions were ended).
        removed: Vec<String>,
        /// Sources whose identity or privilege policy changed (their sessions were ended, to
        /// reconnect under the new entry).
        restarted: Vec<String>,
        /// Sources whose limits changed (in force at once; failover policies are replaced too).
        changed: Vec<String>,
    },
    /// To [`ControlRequest::TestFailover`]: the test started, or the one ended (`None`: no
    /// test was running).
    Test {
        /// The test.
        test: Option<doppel_failover::rehearsal::TestReport>,
        /// It was ended.
        ended: bool,
    },
    /// To [`ControlRequest::Bookmark`]: its place in the op stream.
    Bookmarked {
        /// The bookmark's sequence (its point).
        seq: u64,
    },
    /// The request failed, or could not be read.
    Error {
        /// Why, in words.
        message: String,
    },
}

impl ControlResponse {
    /// An error answer.
    pub fn error(message: impl Into<String>) -> ControlResponse {
        ControlResponse::Error { message: message.into() }
    }
}

/// What one process reports to [`ControlRequest::Status`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Running jobs (an agent).
    #[serde(default)]
    pub jobs: Vec<JobStatusSnapshot>,
    /// Jobs receiving their replica back before a failback's cutover (`protect --failback`).
    #[serde(default)]
    pub receiving: Vec<ReceivingJob>,
    /// Replicas (a target).
    #[serde(default)]
    pub replicas: Vec<ReplicaStatus>,
    /// Sources and their failover state (a target).
    #[serde(default)]
    pub sources: Vec<SourceRow>,
}

/// A job of `protect --failback` that receives its tree back from the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceivingJob {
    /// Job name.
    pub job: String,
    /// Always `failback`.
    pub state: String,
    /// The failback stream is the job's connection.
    pub connected: bool,
    /// Where the job is protected to.
    pub dest: String,
    /// What happens next, in words.
    pub detail: String,
}

impl ReceivingJob {
    /// The row of `job`, protected to `dest`, while it receives its replica back.
    pub fn new(job: &str, dest: &str) -> ReceivingJob {
        ReceivingJob {
            job: job.to_string(),
            state: "failback".into(),
            connected: true,
            dest: dest.to_string(),
            detail: "receiving the replica; the job is handed back when `doppel failback` runs on the target"
                .into(),
        }
    }
}

/// [`doppel_failover::SourceStatus`] on the wire (that type is not readable back).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceRow {
    /// The source.
    pub source: String,
    /// `auto` or `manual`.
    pub policy: doppel_failover::Policy,
    /// `never-seen`, `alive`, `stopped`, `silent`, `failed`, `failing-over`, `failed-over`,
    /// `failing-back`.
    pub state: doppel_failover::SourceState,
    /// Seconds since the source was last heard from.
    pub silent_secs: f64,
    /// Seconds until the source counts as failed, while it is silent and no probe answers.
    pub failover_in_secs: Option<f64>,
    /// Checks missed in a row.
    pub missed: u32,
    /// Checks missed in a row that count as a failure.
    pub threshold: u32,
    /// The last error of a failover or failback, until one succeeds.
    pub error: Option<String>,
    /// Jobs.
    pub jobs: Vec<SourceJobRow>,
    /// The test failover running, if one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<doppel_failover::rehearsal::TestReport>,
}

/// One job of a [`SourceRow`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceJobRow {
    /// The job.
    pub job: String,
    /// The workload runs on the replica.
    pub failed_over: bool,
    /// The replica's epoch.
    pub epoch: u64,
    /// The failback stream, while one runs.
    pub failback: Option<FailbackRow>,
}

/// A running failback stream of a [`SourceJobRow`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailbackRow {
    /// The sending job's state.
    pub state: String,
    /// The source is connected.
    pub connected: bool,
    /// Bytes sent to the source.
    pub bytes_sent: u64,
    /// Bytes not yet applied by the source.
    pub pending_bytes: u64,
    /// Bytes of the replica read to compare it with the source (files unchanged on both sides
    /// since the failover are not read).
    #[serde(default)]
    pub bytes_hashed: u64,
}

impl From<doppel_failover::SourceStatus> for SourceRow {
    fn from(s: doppel_failover::SourceStatus) -> SourceRow {
        SourceRow {
            source: s.source,
            policy: s.policy,
            state: s.state,
            silent_secs: s.silent_secs,
            failover_in_secs: s.failover_in_secs,
            missed: s.missed,
            threshold: s.threshold,
            error: s.error,
            jobs: s
                .jobs
                .into_iter()
                .map(|j| SourceJobRow {
                    job: j.job,
                    failed_over: j.failed_over,
                    epoch: j.epoch,
                    failback: j.failback.map(|f| FailbackRow {
                        state: f.state,
                        connected: f.connected,
                        bytes_sent: f.bytes_sent,
                        pending_bytes: f.pending_bytes,
                        bytes_hashed: f.bytes_hashed,
                    }),
                })
                .collect(),
            test: None,
        }
    }
}

/// A request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// [`VERSION`] of the client.
    pub version: u32,
    /// What it asks.
    #[serde(flatten)]
    pub request: ControlRequest,
}

/// An answer line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// [`VERSION`] of the process.
    pub version: u32,
    /// The answer.
    #[serde(flatten)]
    pub response: ControlResponse,
}

/// Why a request line was not served.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Not a JSON object.
    #[error("malformed request (expected one JSON object per line): {0}")]
    Malformed(#[source] serde_json::Error),
    /// No `version`: a client older than the typed protocol.
    #[error(
        "the request has no control protocol version: the client is an older doppel than this process (version {VERSION}); use the same doppel binary"
    )]
    NoVersion,
    /// Another version.
    #[error(
        "the client speaks control protocol version {0}, this process version {VERSION}: use the same doppel binary"
    )]
    Version(u32),
    /// No `op`.
    #[error("the request names no op (one of {ops})", ops = ControlRequest::OPS.join(", "))]
    NoOp,
    /// An op this process does not know.
    #[error("unknown op {0:?} (this process serves {ops})", ops = ControlRequest::OPS.join(", "))]
    UnknownOp(String),
    /// A known op with missing or wrong fields.
    #[error("bad {op} request: {source}")]
    Fields {
        /// The op.
        op: String,
        /// What is wrong.
        #[source]
        source: serde_json::Error,
    },
}

/// Reads a request line, checking the version and the op before the fields, so that each
/// problem is named as what it is.
pub fn decode_request(line: &[u8]) -> Result<ControlRequest, RequestError> {
    #[derive(Deserialize)]
    struct Probe {
        version: Option<u32>,
        op: Option<String>,
    }
    let probe: Probe = serde_json::from_slice(line).map_err(RequestError::Malformed)?;
    match probe.version {
        None => return Err(RequestError::NoVersion),
        Some(v) if v != VERSION => return Err(RequestError::Version(v)),
        Some(_) => {}
    }
    let op = probe.op.ok_or(RequestError::NoOp)?;
    if !ControlRequest::OPS.contains(&op.as_str()) {
        return Err(RequestError::UnknownOp(op));
    }
    let r: Request = serde_json::from_slice(line).map_err(|source| RequestError::Fields { op, source })?;
    Ok(r.request)
}

/// An answer line, newline included.
pub fn encode_response(response: ControlResponse) -> Vec<u8> {
    let mut line = serde_json::to_vec(&Response { version: VERSION, response }).unwrap_or_else(|e| {
        let error = ControlResponse::error(format!("the answer could not be encoded: {e}"));
        serde_json::to_vec(&Response { version: VERSION, response: error }).expect("an error answer encodes")
    });
    line.push(b'\n');
    line
}

/// Answers one request.
pub type Handler =
    Arc<dyn Fn(ControlRequest) -> Pin<Box<dyn Future<Output = ControlResponse> + Send>> + Send + Sync>;

/// `HOME/run`.
pub fn run_dir(home: &Path) -> PathBuf {
    home.join("run")
}

/// Serves `handler` on the socket at `path` until `stop` is cancelled; removes the socket then.
pub async fn serve(path: PathBuf, handler: Handler, stop: CancellationToken) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // A socket left by a killed process is stale if nobody answers on it.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            anyhow::bail!("another doppel process is already serving {}", path.display());
        }
        let _ = std::fs::remove_file(&path);
    }
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
        };
        tokio::spawn(connection(stream, handler.clone()));
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Answers the requests of one client, one line each, until it hangs up.
async fn connection(stream: tokio::net::UnixStream, handler: Handler) {
    let (r, mut w) = stream.into_split();
    let mut r = tokio::io::BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let answer = match decode_request(&line) {
            Ok(req) => handler(req).await,
            Err(e) => ControlResponse::error(e.to_string()),
        };
        if w.write_all(&encode_response(answer)).await.is_err() {
            break;
        }
    }
}

/// Why a call on a control socket failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nothing listens (a socket left by a process that is gone).
    #[error("nothing answers on {}: {source}", path.display())]
    Unreachable {
        /// The socket.
        path: PathBuf,
        /// The connect error.
        source: std::io::Error,
    },
    /// A process is there but gave no answer (in time).
    #[error("no answer on {}: {source}", path.display())]
    NoAnswer {
        /// The socket.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The process speaks another version of the control protocol.
    #[error("the process on {} speaks control protocol {}, this doppel version {VERSION}: restart it with this binary", path.display(), theirs.map_or("from before versions".to_string(), |v| format!("version {v}")))]
    Version {
        /// The socket.
        path: PathBuf,
        /// Its version (`None`: older than versions).
        theirs: Option<u32>,
    },
    /// The answer cannot be read.
    #[error("unreadable answer on {}: {source}", path.display())]
    Garbled {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
}

/// Reads an answer line from the process at `path`.
pub fn decode_response(path: &Path, line: &[u8]) -> Result<ControlResponse, CallError> {
    #[derive(Deserialize)]
    struct Probe {
        version: Option<u32>,
    }
    let garbled = |source| CallError::Garbled { path: path.to_path_buf(), source };
    let probe: Probe = serde_json::from_slice(line).map_err(garbled)?;
    if probe.version != Some(VERSION) {
        return Err(CallError::Version { path: path.to_path_buf(), theirs: probe.version });
    }
    let r: Response = serde_json::from_slice(line).map_err(garbled)?;
    Ok(r.response)
}

/// Sends one request and waits up to `timeout` for the answer.
pub fn call(path: &Path, req: &ControlRequest, timeout: Duration) -> Result<ControlResponse, CallError> {
    let no_answer = |source| CallError::NoAnswer { path: path.to_path_buf(), source };
    let mut s = std::os::unix::net::UnixStream::connect(path)
        .map_err(|source| CallError::Unreachable { path: path.to_path_buf(), source })?;
    s.set_read_timeout(Some(timeout)).map_err(no_answer)?;
    let mut line =
        serde_json::to_vec(&Request { version: VERSION, request: req.clone() }).expect("a request encodes");
    line.push(b'\n');
    s.write_all(&line).map_err(no_answer)?;
    let mut answer = Vec::new();
    let n = BufReader::new(s).read_until(b'\n', &mut answer).map_err(no_answer)?;
    if n == 0 {
        return Err(no_answer(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the process closed the connection",
        )));
    }
    decode_response(path, &answer)
}

/// The sockets of running processes under `home`.
pub fn sockets(home: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(run_dir(home))
        .map(|rd| {
            rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "sock")).collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The socket of a running job.
pub fn job_socket(home: &Path, job: &str) -> PathBuf {
    run_dir(home).join(format!("job-{job}.sock"))
}

/// The job a socket serves, if it is a job's (`job-NAME.sock`).
pub fn job_of_socket(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix("job-")?.strip_suffix(".sock").map(str::to_string)
}

#[cfg(test)]
mod tests;
