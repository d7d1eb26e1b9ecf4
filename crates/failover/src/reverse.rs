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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use doppel_agent::status::JobStatusSnapshot;
use doppel_agent::{Agent, AgentError, Connector, Destination, JobConfig, Settler, StatusSource};
use doppel_proto::Message;
use doppel_target::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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
        let mut mirrored = self.mirrored.lock().unwrap_or_else(|p| p.into_inner());
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
    pub fn ready(&self) -> Result<(), String> {
        let s = self.snapshot();
        if !s.connected {
            return Err(format!("the source is not connected for failback ({}: {})", s.state, s.detail));
        }
        if s.state != "replicating" {
            return Err(format!(
                "still {} ({} bytes sent so far, {} pending): wait until status shows the failback replicating",
                s.state, s.bytes_sent, s.pending_bytes
            ));
        }
        Ok(())
    }

    /// The final sync of a cutover: takes in every change made so far and waits until the
    /// source has applied it. The workload must be stopped first.
    pub async fn drain(&self, within: Duration) -> Result<(), String> {
        self.settler.settle().await.map_err(|e| e.to_string())?;
        let captured = self.snapshot().last_captured_seq;
        let deadline = Instant::now() + within;
        loop {
            let s = self.snapshot();
            if s.last_acked_seq >= captured {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the source applied up to {} of {captured} within {within:?} ({}: {})",
                    s.last_acked_seq, s.state, s.detail
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Ends the stream with `last` (the handover) and stops the job.
    pub async fn hand_over(&self, last: Message) -> Result<(), String> {
        *self.final_message.lock() = Some(last);
        self.stop().await
    }

    /// Stops the job (without a handover, unless one was set).
    pub async fn stop(&self) -> Result<(), String> {
        self.shutdown.cancel();
        let handle = self.run.lock().await.take();
        match handle {
            Some(h) => match h.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            },
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
