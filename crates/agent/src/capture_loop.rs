//! The capture thread: watch events in, ops out.
//!
//! It owns the reconciler (and so the index) alone, so no lock guards the index. The link
//! sends it commands when the target's answer decides how to bring the replica in line:
//! a whole-tree difference mirror, or a mirror of the names that changed after the last
//! index checkpoint (after a crash). Until one of those has happened, or a clean restart let
//! it compare the tree with its saved index locally, it only buffers events: emitting ops
//! against an index that may not describe the replica would be wrong.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use doppel_capture::{EventSource, FsEvent};
use doppel_mirror::{EventQueue, MirrorError, OpSink, Reconciler, VerifyReport};
use doppel_proto::{Entry, Op, RelPath};
use doppel_spool::{Placement, Spool};
use doppel_target::registry::now_us;
use tokio::sync::oneshot;

use crate::error::AgentError;
use crate::state::JobState;
use crate::status::JobStatus;

/// Events kept while waiting for the link's decision; beyond this a full rescan follows.
const MAX_BUFFERED_EVENTS: usize = 200_000;

/// Orders from the link.
pub enum Command {
    /// The target's replica is unknown to the index: compare the whole tree with `listing`.
    /// Pending ops are discarded and numbering continues after `applied`; `started` is
    /// answered once that is done, so the link can start sending.
    MirrorAll {
        /// The target's applied sequence.
        applied: u64,
        /// The replica's id.
        replica_id: [u8; 16],
        /// The replica's epoch.
        epoch: u64,
        /// The target's listing of the whole replica.
        listing: Vec<Entry>,
        /// Answered when numbering was reset.
        started: oneshot::Sender<()>,
    },
    /// After a crash: which names may differ from the saved index?
    Suspects {
        /// The answer.
        reply: oneshot::Sender<Vec<RelPath>>,
    },
    /// Compare the whole tree with `listing` and report; with `repair`, also bring the names
    /// that differ in line.
    Verify {
        /// The target's listing of the whole replica.
        listing: Vec<Entry>,
        /// Queue repairs.
        repair: bool,
        /// The report, or why there is none.
        reply: oneshot::Sender<Result<VerifyReport, String>>,
    },
    /// After a crash: compare these names with the target's listing of them.
    MirrorPaths {
        /// The names.
        paths: Vec<RelPath>,
        /// The target's listing of them.
        listing: Vec<Entry>,
        /// The replica's id.
        replica_id: [u8; 16],
        /// The replica's epoch.
        epoch: u64,
    },
}

/// Whether the capture thread may emit ops yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Waiting for the link's decision.
    Waiting,
    /// Turning events into ops.
    Streaming,
}

/// Everything the capture thread owns.
pub struct Capture {
    /// The reconciler (and index).
    pub rec: Reconciler,
    /// Where ops go.
    pub spool: Arc<Spool>,
    /// The watch.
    pub watch: Box<dyn EventSource>,
    /// Index file.
    pub index_path: PathBuf,
    /// Job state file.
    pub state_path: PathBuf,
    /// Job state (shared with the link).
    pub state: Arc<Mutex<JobState>>,
    /// Live status.
    pub status: Arc<JobStatus>,
    /// Set to stop.
    pub stop: Arc<AtomicBool>,
    /// Commands from the link.
    pub commands: Receiver<Command>,
    /// When the loaded index was saved, if a crash left recovery to do.
    pub crash_recovery: Option<u64>,
    /// The previous run ended cleanly and the index describes the replica: compare locally.
    pub local_rescan: bool,
    /// Settle time for events.
    pub debounce: Duration,
    /// How often to checkpoint the index.
    pub checkpoint_interval: Duration,
}

/// Sends ops to the spool.
struct SpoolSink<'a> {
    spool: &'a Spool,
    placement: Placement,
    /// Set for long mirrors, so a stop request interrupts them.
    stop: Option<&'a AtomicBool>,
}

impl OpSink for SpoolSink<'_> {
    fn emit(&mut self, op: Op) -> Result<(), MirrorError> {
        if self.stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            return Err(MirrorError::Sink("stopping".into()));
        }
        self.spool
            .append(op, now_us(), self.placement, true)
            .map(|_| ())
            .map_err(|e| MirrorError::Sink(e.to_string()))
    }
}

impl Capture {
    /// Runs until stopped. Returns whether the job ended cleanly (index and spool saved
    /// together, so the next start can compare locally).
    pub fn run(mut self) -> Result<bool, AgentError> {
        *self.status.reconcile.lock().unwrap_or_else(|p| p.into_inner()) = Some(self.rec.stats());
        *self.status.backend.lock().unwrap_or_else(|p| p.into_inner()) = self.watch.backend().to_string();
        let mut mode = Mode::Waiting;
        let mut queue = EventQueue::new();
        let mut buffered: Vec<FsEvent> = Vec::new();
        let mut overflowed = false;
        if self.local_rescan {
            self.status.set_state("scanning");
            let spool = self.spool.clone();
            let mut sink = SpoolSink { spool: &spool, placement: Placement::Spill, stop: Some(&self.stop) };
            self.rec.sync_tree(&RelPath::root(), &mut sink)?;
            self.rec.finish(&mut sink)?;
            mode = Mode::Streaming;
            self.status.set_state("replicating");
        }
        let mut last_checkpoint = Instant::now();
        let mut dirty_since_checkpoint = false;
        let mut events = Vec::new();
        while !self.stop.load(Ordering::Relaxed) {
            match self.commands.recv_timeout(Duration::ZERO) {
                Ok(cmd) => {
                    if self.handle(cmd)? {
                        mode = Mode::Streaming;
                        let spool = self.spool.clone();
                        let mut sink = SpoolSink { spool: &spool, placement: Placement::Spill, stop: None };
                        for ev in buffered.drain(..) {
                            queue.push(ev, &mut self.rec, &mut sink)?;
                        }
                        if overflowed {
                            queue.rescan_all();
                            overflowed = false;
                        }
                        dirty_since_checkpoint = true;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            events.clear();
            let wait = if queue.is_empty() { Duration::from_millis(100) } else { self.debounce / 2 };
            self.watch
                .read(&mut events, wait)
                .map_err(|e| AgentError::Io { path: self.rec.root().to_path_buf(), source: e })?;
            match mode {
                Mode::Waiting => {
                    if buffered.len() + events.len() > MAX_BUFFERED_EVENTS {
                        overflowed = true;
                        buffered.clear();
                    } else {
                        buffered.append(&mut events);
                    }
                }
                Mode::Streaming => {
                    let spool = self.spool.clone();
                    let mut sink = SpoolSink { spool: &spool, placement: Placement::Spill, stop: None };
                    for ev in events.drain(..) {
                        queue.push(ev, &mut self.rec, &mut sink)?;
                    }
                    if !queue.is_empty() && (queue.due(self.debounce) || queue.len() > 10_000) {
                        queue.flush(&mut self.rec, &mut sink)?;
                        dirty_since_checkpoint = true;
                    }
                }
            }
            if mode == Mode::Streaming
                && dirty_since_checkpoint
                && last_checkpoint.elapsed() >= self.checkpoint_interval
            {
                self.checkpoint()?;
                last_checkpoint = Instant::now();
                dirty_since_checkpoint = false;
            }
        }
        if mode != Mode::Streaming || self.crash_recovery.is_some() {
            return Ok(false);
        }
        // Stopping: take in what is left, then save spool and index together.
        let mut events = Vec::new();
        let _ = self.watch.read(&mut events, Duration::ZERO);
        let spool = self.spool.clone();
        let mut sink = SpoolSink { spool: &spool, placement: Placement::Spill, stop: None };
        for ev in events {
            queue.push(ev, &mut self.rec, &mut sink)?;
        }
        queue.flush(&mut self.rec, &mut sink)?;
        self.checkpoint()?;
        Ok(true)
    }

    /// Saves the spool durably, then the index that describes it.
    fn checkpoint(&mut self) -> Result<(), AgentError> {
        self.spool.persist()?;
        let seq = self.spool.stats().last_seq;
        self.rec.index.save(&self.index_path, now_us(), seq)?;
        Ok(())
    }

    /// Carries out a command; returns whether streaming may start.
    fn handle(&mut self, cmd: Command) -> Result<bool, AgentError> {
        match cmd {
            Command::MirrorAll { applied, replica_id, epoch, listing, started } => {
                self.status.set_state("mirroring");
                // The index is about to describe another replica: forget the old one first,
                // so a crash mid-mirror leads to a fresh mirror.
                {
                    let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    st.replica_id = None;
                    st.save(&self.state_path)?;
                }
                self.spool.reset(applied)?;
                let _ = started.send(());
                tracing::info!(entries = listing.len(), "difference mirror: comparing the whole tree");
                self.rec.seed_all(listing);
                let spool = self.spool.clone();
                let mut sink =
                    SpoolSink { spool: &spool, placement: Placement::WaitForMemory, stop: Some(&self.stop) };
                let t = Instant::now();
                self.rec.sync_tree(&RelPath::root(), &mut sink)?;
                self.rec.finish(&mut sink)?;
                let stats = self.rec.stats();
                tracing::info!(
                    seconds = t.elapsed().as_secs_f64(),
                    files_hashed = stats.files_hashed.load(Ordering::Relaxed),
                    bytes_queued = stats.bytes_emitted.load(Ordering::Relaxed),
                    "difference mirror: tree compared"
                );
                self.complete(replica_id, epoch)?;
                Ok(true)
            }
            Command::Suspects { reply } => {
                let saved_at = self.crash_recovery.unwrap_or(0);
                let s = self.rec.suspects(saved_at)?;
                tracing::info!(names = s.len(), "after an unclean stop: names to compare with the replica");
                let _ = reply.send(s);
                Ok(false)
            }
            Command::Verify { listing, repair, reply } => {
                let result = self.verify(listing, repair);
                let _ = reply.send(result.map_err(|e| e.to_string()));
                Ok(false)
            }
            Command::MirrorPaths { paths, listing, replica_id, epoch } => {
                self.status.set_state("mirroring");
                self.rec.seed_paths(&paths, listing);
                let spool = self.spool.clone();
                let mut sink =
                    SpoolSink { spool: &spool, placement: Placement::WaitForMemory, stop: Some(&self.stop) };
                for p in &paths {
                    self.rec.sync_entry(p, &mut sink)?;
                }
                self.rec.finish(&mut sink)?;
                self.crash_recovery = None;
                self.complete(replica_id, epoch)?;
                Ok(true)
            }
        }
    }

    fn verify(&mut self, listing: Vec<Entry>, repair: bool) -> Result<VerifyReport, AgentError> {
        let t = Instant::now();
        let (mut report, paths) =
            doppel_mirror::verify::compare(self.rec.root(), self.rec.selection().clone(), listing.clone())?;
        tracing::info!(
            seconds = t.elapsed().as_secs_f64(),
            compared = report.entries_compared,
            differences = report.differences.len(),
            "verify: tree compared"
        );
        if repair && !paths.is_empty() {
            let wanted: std::collections::BTreeSet<&RelPath> = paths.iter().collect();
            let subset: Vec<Entry> = listing
                .into_iter()
                .filter(|e| RelPath::try_from(&e.path).is_ok_and(|p| wanted.contains(&p)))
                .collect();
            self.rec.seed_paths(&paths, subset);
            let spool = self.spool.clone();
            let mut sink =
                SpoolSink { spool: &spool, placement: Placement::WaitForMemory, stop: Some(&self.stop) };
            for p in &paths {
                self.rec.sync_entry(p, &mut sink)?;
            }
            self.rec.finish(&mut sink)?;
            report.repaired = paths.iter().map(|p| p.to_string()).collect();
        }
        Ok(report)
    }

    /// The index now describes `replica_id`: checkpoint, and remember it.
    fn complete(&mut self, replica_id: [u8; 16], epoch: u64) -> Result<(), AgentError> {
        self.checkpoint()?;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.replica_id = Some(replica_id);
        st.epoch = epoch;
        st.save(&self.state_path)?;
        drop(st);
        self.status.set_state("replicating");
        Ok(())
    }
}
