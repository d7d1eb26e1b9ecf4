//! The DR side of a failback: the replica, where the workload now runs, protected back to its
//! source by an ordinary agent.
//!
//! Nothing here is special-purpose replication: the replica tree is a job like any other
//! (watch capture, spool, adaptive sender), its first connection runs the difference mirror
//! (the source lists its blocks, only blocks that differ travel), and it then streams the
//! workload's changes as they happen. The one difference is the direction of the
//! connections: the DR side cannot dial a source that may sit behind NAT or a firewall, so the
//! source opens them and the target hands each one to this job ([`ReverseJob::offer`]). The
//! cutover ([`ReverseJob::hand_over`]) takes in the last changes, waits until the source
//! applied them, and ends the stream with the handover message.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use doppel_agent::status::JobStatusSnapshot;
use doppel_agent::{Agent, AgentError, Connector, Destination, JobConfig, Settler, StatusSource};
use doppel_proto::Message;
use doppel_target::Stream;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Why a failback stream cannot be cut over (yet), or its cutover failed.
#[derive(Debug, thiserror::Error)]
pub enum ReverseError {
    /// The source is not connected.
    #[error("the source is not connected for failback ({state}: {detail})")]
    NotConnected {
        /// The sending job's state.
        state: String,
        /// More, in words.
        detail: String,
    },
    /// The source does not hold the whole replica yet.
    #[error(
        "still {state} ({bytes_sent} bytes sent so far, {pending_bytes} pending): wait until status shows the failback replicating"
    )]
    NotReplicating {
        /// The sending job's state.
        state: String,
        /// Bytes sent so far.
        bytes_sent: u64,
        /// Bytes not yet applied by the source.
        pending_bytes: u64,
    },
    /// The sending job could not take in the last changes.
    #[error("cannot take in the last changes: {0}")]
    Settle(#[source] doppel_agent::RequestError),
    /// The source did not apply everything within the cutover time.
    #[error("the source applied up to {acked} of {captured} within {within:?} ({state}: {detail})")]
    NotApplied {
        /// The last op the source applied.
        acked: u64,
        /// The last op to apply.
        captured: u64,
        /// The time allowed.
        within: Duration,
        /// The sending job's state.
        state: String,
        /// More, in words.
        detail: String,
    },
    /// The sending job ended with an error.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The sending job's task panicked or was cancelled.
    #[error("the failback job's task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A running failback of one job.
pub struct ReverseJob {
    /// The source.
    pub source: String,
    /// The job.
    pub job: String,
    streams: mpsc::Sender<Box<dyn Stream>>,
    status: StatusSource,
    settler: Settler,
    final_message: doppel_agent::agent::FinalMessage,
    shutdown: CancellationToken,
    run: tokio::sync::Mutex<Option<tokio::task::JoinHandle<Result<(), AgentError>>>>,
    /// The agent's state directory (`DATA/failback/SOURCE`).
    home: PathBuf,
    /// The last op of the comparison that started the failback, once it is known.
    mirrored: Mutex<Option<u64>>,
}

impl ReverseJob {
    /// Starts protecting `replica` (the tree of `job` from `source`) back to the source, with
    /// state under `home`, at most `limit` bytes per second (0: unlimited). Blocking: it opens
    /// the watch and the spool.
    pub fn start(
        source: &str,
        job: &str,
        replica: &Path,
        home: &Path,
        limit: u64,
    ) -> Result<Arc<ReverseJob>, AgentError> {
        let mut cfg =
            JobConfig::new(job, replica.to_path_buf(), Destination::Failback { source: source.to_string() });
        cfg.bandwidth = doppel_agent::Schedule::constant(limit);
        let (tx, rx) = mpsc::channel(4);
        let agent = Agent::new_with(cfg, home, Some(Connector::incoming(rx)))?;
        let shutdown = CancellationToken::new();
        let r = Arc::new(ReverseJob {
            source: source.to_string(),
            job: job.to_string(),
            streams: tx,
            status: agent.status_source(),
            settler: agent.settler(),
            final_message: agent.final_message(),
            shutdown: shutdown.clone(),
            run: tokio::sync::Mutex::new(None),
            home: home.to_path_buf(),
            mirrored: Mutex::new(None),
        });
        let handle = tokio::spawn(agent.run(shutdown));
        *r.run.try_lock().expect("fresh") = Some(handle);
        Ok(r)
    }

    /// Gives the job a connection the source opened; hands it back if the job cannot take it.
    pub fn offer(&self, stream: Box<dyn Stream>) -> Result<(), Box<dyn Stream>> {
        self.streams.try_send(stream).map_err(|e| match e {
            mpsc::error::TrySendError::Full(s) | mpsc::error::TrySendError::Closed(s) => s,
        })
    }

    /// The job's status, with its state as the failback sees it: the sending job says
    /// `replicating` as soon as its comparison has queued every difference, but the source
    /// holds the replica only once those are acknowledged; until then this says `mirroring`.
    pub fn snapshot(&self) -> JobStatusSnapshot {
        let mut s = self.status.snapshot();
        let mut mirrored = self.mirrored.lock();
        if s.state != "replicating" {
            *mirrored = None;
        } else {
            // Every op of the comparison was captured by the time the state changed; the first
            // look after that is a conservative bound.
            let end = *mirrored.get_or_insert(s.last_captured_seq);
            if s.last_acked_seq < end {
                s.state = "mirroring".into();
            }
        }
        s
    }

    /// Whether the source holds the whole replica and receives changes as they happen.
    pub fn ready(&self) -> Result<(), ReverseError> {
        let s = self.snapshot();
        if !s.connected {
            return Err(ReverseError::NotConnected { state: s.state, detail: s.detail });
        }
        if s.state != "replicating" {
            return Err(ReverseError::NotReplicating {
                state: s.state,
                bytes_sent: s.bytes_sent,
                pending_bytes: s.pending_bytes,
            });
        }
        Ok(())
    }

    /// The final sync of a cutover: takes in every change made so far and waits until the
    /// source has applied it. The workload must be stopped first.
    pub async fn drain(&self, within: Duration) -> Result<(), ReverseError> {
        self.settler.settle().await.map_err(ReverseError::Settle)?;
        let captured = self.snapshot().last_captured_seq;
        let deadline = Instant::now() + within;
        loop {
            let s = self.snapshot();
            if s.last_acked_seq >= captured {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ReverseError::NotApplied {
                    acked: s.last_acked_seq,
                    captured,
                    within,
                    state: s.state,
                    detail: s.detail,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Ends the stream with `last` (the handover) and stops the job.
    pub async fn hand_over(&self, last: Message) -> Result<(), ReverseError> {
        *self.final_message.lock() = Some(last);
        self.stop().await
    }

    /// Stops the job (without a handover, unless one was set).
    pub async fn stop(&self) -> Result<(), ReverseError> {
        self.shutdown.cancel();
        let handle = self.run.lock().await.take();
        match handle {
            Some(h) => Ok(h.await??),
            None => Ok(()),
        }
    }

    /// Whether the job stopped by itself (an error).
    pub fn finished(&self) -> bool {
        self.run.try_lock().map(|h| h.as_ref().is_none_or(|h| h.is_finished())).unwrap_or(false)
    }

    /// Forgets the job's state: a later failback starts with a full comparison.
    pub fn forget(&self) -> std::io::Result<()> {
        let dir = doppel_agent::agent::job_dir(&self.home, &self.job);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}
