//! The apply loop of a session, on a blocking thread.
//!
//! Ops are applied as they arrive and committed in groups. Each commit is one `syncfs` and one
//! checkpoint, then an ack: this is what lets thousands of small ops per second be durable
//! without a flush per op. When a group closes, and what happens while the disk is full, is
//! decided by the pure policy in [`crate::commit`] (tested on a virtual clock); this module is
//! the I/O shell that carries its decisions out: it waits on the queue, applies, commits,
//! acknowledges, reports.
//!
//! An op that fails for lack of space (or another error that may pass) is retried, not
//! skipped: nothing is lost, and the source, receiving no acks, stops sending once its window
//! is full.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use doppel_apply::{ApplyError, Outcome, Replica};
use doppel_proto::{Entry, ListScope, Message, Op, OpRecord};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::commit::{AfterStall, COMMIT_BYTES, Clock, Commit, GroupCommit, Idle, Stall, SystemClock};
use crate::registry::{ReplicaState, Slot};

/// Work for the apply loop, in stream order.
pub enum Work {
    /// Records to apply, and the decode budget they hold until applied.
    Records {
        /// The batch's records.
        records: Vec<OpRecord>,
        /// Their share of the decode budget.
        held: crate::session::Held,
        /// The source waits for acknowledgements ([`doppel_proto::Batch::ack_wanted`]).
        ack_wanted: bool,
    },
    /// A listing to produce (after everything before it is applied).
    List {
        /// Request id.
        id: u64,
        /// What to list.
        scope: ListScope,
    },
}

/// Entries per listing message, at most.
const LIST_CHUNK: usize = 256;
/// Approximate bytes per listing message, at most (well under the frame cap).
const LIST_CHUNK_BYTES: usize = 1 << 20;

/// Roughly what an entry weighs on the wire.
fn weight(e: &Entry) -> usize {
    128 + e.path.0.len()
        + e.link_target.len()
        + e.blocks.len() * 32
        + e.xattrs.iter().map(|x| x.name.len() + x.value.len()).sum::<usize>()
}

/// Starts `f` on a thread of its own (not the runtime's blocking pool: a session's worker
/// lives as long as its session, and hundreds of sessions would exhaust the pool that opening
/// replicas and short blocking tasks of every other source need). The receiver yields `f`'s
/// result, or an error if it panicked.
pub fn spawn<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> tokio::sync::oneshot::Receiver<R> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Handle::current();
    let spawned = std::thread::Builder::new().name("doppel-apply".into()).spawn(move || {
        let _entered = runtime.enter();
        let _ = tx.send(f());
    });
    if let Err(e) = spawned {
        // Out of threads: the receiver reports it as a failed worker (its sender is gone).
        tracing::error!(error = %e, "cannot start an apply worker thread");
    }
    rx
}

/// Runs until `rx` closes (the session ended) or the session is cancelled; returns the
/// replica for the next session.
pub fn run(
    replica: Replica,
    mut rx: mpsc::Receiver<Work>,
    tx: mpsc::Sender<Outgoing>,
    slot: Arc<Slot>,
    commit_interval: std::time::Duration,
    cancel: CancellationToken,
    listings: Listings,
) -> Replica {
    let clock = SystemClock;
    let policy =
        GroupCommit::new(commit_interval, COMMIT_BYTES, replica.applied(), replica.durable(), clock.now());
    let worker =
        Worker { replica, tx, slot, cancel, policy, stall: Stall::new(), clock, listings, flushing: None };
    worker.run(&mut rx)
}

/// How a session's worker answers listings.
pub struct Listings {
    /// The source's listing budget (see [`Worker::list`]).
    pub budget: Arc<tokio::sync::Semaphore>,
    /// Block hashes known without reading the files (see [`crate::TargetConfig::known_blocks`]).
    pub known: Option<Arc<dyn doppel_apply::listing::KnownBlocks>>,
}

/// What the worker takes on next.
enum Next {
    Work(Work),
    Commit(Commit),
    /// The commit running beside the applying ended.
    Flushed(FlushResult),
    Closed,
}

type FlushResult = Result<doppel_apply::Flushed, ApplyError>;

/// A commit whose writes run on a thread of their own while the worker applies on.
struct InFlight {
    done: tokio::sync::oneshot::Receiver<FlushResult>,
}

/// The apply loop's state: the replica, where its answers go, and the commit policy.
struct Worker<C: Clock> {
    replica: Replica,
    tx: mpsc::Sender<Outgoing>,
    slot: Arc<Slot>,
    cancel: CancellationToken,
    policy: GroupCommit,
    stall: Stall,
    clock: C,
    listings: Listings,
    /// The commit running beside the applying, if any (at most one).
    flushing: Option<InFlight>,
}

impl<C: Clock> Worker<C> {
    fn run(mut self, rx: &mut mpsc::Receiver<Work>) -> Replica {
        loop {
            match self.next(rx) {
                Next::Work(Work::Records { records, held: _held, ack_wanted }) => {
                    if !self.records(&records, ack_wanted, rx) {
                        // The session is over (broken stream or gone peer): keep what was
                        // applied durable, and make the reader stop too.
                        self.commit(Commit::CLEAN);
                        self.cancel.cancel();
                        return self.replica;
                    }
                }
                Next::Work(Work::List { id, scope }) => self.list(id, &scope),
                Next::Commit(c) => self.commit(c),
                Next::Flushed(r) => self.flushed(r),
                Next::Closed => break,
            }
        }
        self.commit(Commit::CLEAN);
        self.replica
    }

    /// Takes the next piece of work, or the commit the policy says is due while the queue is
    /// empty.
    fn next(&mut self, rx: &mut mpsc::Receiver<Work>) -> Next {
        match rx.try_recv() {
            Ok(w) => return Next::Work(w),
            Err(mpsc::error::TryRecvError::Disconnected) => return Next::Closed,
            Err(mpsc::error::TryRecvError::Empty) => {}
        }
        if let Some(f) = &mut self.flushing {
            // Whichever comes first: more work, or the end of the commit (its ack).
            let runtime = tokio::runtime::Handle::current();
            return runtime.block_on(async {
                tokio::select! {
                    w = rx.recv() => w.map_or(Next::Closed, Next::Work),
                    r = &mut f.done => Next::Flushed(r.unwrap_or_else(|_| Err(flush_lost()))),
                }
            });
        }
        let now = self.clock.now();
        match self.policy.idle(now) {
            Idle::WaitForWork => rx.blocking_recv().map_or(Next::Closed, Next::Work),
            Idle::CommitNow(c) => Next::Commit(c),
            Idle::WaitUntil(due) => {
                let wait = due.saturating_duration_since(now);
                let runtime = tokio::runtime::Handle::current();
                match runtime.block_on(async { tokio::time::timeout(wait, rx.recv()).await }) {
                    Ok(Some(w)) => Next::Work(w),
                    Ok(None) => Next::Closed,
                    Err(_) => Next::Commit(Commit::CLEAN),
                }
            }
        }
    }

    /// Makes everything applied durable and acknowledges it.
    fn commit(&mut self, c: Commit) {
        self.settle();
        let r = if c.dirty { self.replica.commit_continuing() } else { self.replica.commit() };
        let durable = self.acknowledge(r);
        self.policy.committed(self.clock.now(), durable);
    }

    /// Starts a commit of everything applied whose writes run on a thread of their own while
    /// the worker applies the ops queued behind it (so the apply never waits on the disk's
    /// flush); its ack goes once they are done. At most one runs: a commit due before the
    /// last one ended waits for it.
    fn commit_beside(&mut self) {
        self.settle();
        match self.replica.begin_commit() {
            Ok(Some(flush)) => {
                let (tx, done) = tokio::sync::oneshot::channel();
                let spawned = std::thread::Builder::new().name("doppel-flush".into()).spawn(move || {
                    let _ = tx.send(flush.run());
                });
                match spawned {
                    Ok(_) => {
                        self.flushing = Some(InFlight { done });
                        self.policy.began(self.clock.now());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "no thread to commit beside the applying: committing here");
                        // What the dropped flush was to sync is no longer listed: all of it.
                        self.replica.commit_failed();
                        self.commit(Commit { dirty: true });
                    }
                }
            }
            Ok(None) => self.policy.committed(self.clock.now(), Some(self.replica.applied())),
            Err(e) => {
                tracing::error!(error = %e, "commit failed");
                self.policy.committed(self.clock.now(), None);
            }
        }
    }

    /// Waits for the commit running beside the applying, if any, and ends it.
    fn settle(&mut self) {
        if let Some(f) = self.flushing.take() {
            let r = f.done.blocking_recv().unwrap_or_else(|_| Err(flush_lost()));
            self.end_flush(r);
        }
    }

    /// The commit running beside the applying ended with `r`.
    fn flushed(&mut self, r: FlushResult) {
        self.flushing = None;
        self.end_flush(r);
    }

    fn end_flush(&mut self, r: FlushResult) {
        if r.is_err() {
            self.replica.commit_failed();
        }
        let r = r.and_then(|done| self.replica.end_commit(done));
        let durable = self.acknowledge(r);
        self.policy.finished(durable);
    }

    /// Reports and acknowledges what a commit made durable; the durable sequence, `None` if
    /// it failed.
    fn acknowledge(&mut self, r: Result<u64, ApplyError>) -> Option<u64> {
        let before = self.policy.durable();
        match r {
            Ok(seq) => {
                self.slot.status.durable.store(seq, Ordering::Relaxed);
                *self.slot.status.history.lock() = self.replica.history().map(|h| h.status());
                if seq > before {
                    let _ = self.send(Message::Ack { seq });
                }
                Some(seq)
            }
            Err(e) => {
                tracing::error!(error = %e, "commit failed");
                None
            }
        }
    }

    /// Applies a batch of records, then commits if the policy says the group is closed.
    /// Returns false if the session must end.
    fn records(&mut self, recs: &[OpRecord], ack_wanted: bool, rx: &mpsc::Receiver<Work>) -> bool {
        for (i, rec) in recs.iter().enumerate() {
            // A run of new files starting here is applied on several threads first; each of
            // its ops is then only counted, in order, below.
            self.replica.apply_ahead(&recs[i..]);
            if !self.apply_with_retry(rec) {
                return false;
            }
            // A named point is made durable at once too: an operator waits on a bookmark.
            let fsync = matches!(rec.op, Op::Fsync { .. } | Op::Point { .. });
            self.policy.op_applied(self.replica.applied(), rec.op.data_len() as u64, fsync);
        }
        if let Some(last) = recs.last() {
            self.slot.status.applied_now(self.replica.applied(), last.time_us);
        }
        let unreplicated = self.replica.unreplicated();
        if !unreplicated.is_empty() || self.slot.status.unreplicated.lock().1 > 0 {
            let shown = unreplicated.list(crate::registry::UNREPLICATED_SHOWN);
            *self.slot.status.unreplicated.lock() = (shown, unreplicated.len() as u64);
        }
        match self.policy.after_batch(self.clock.now(), !rx.is_empty(), ack_wanted) {
            // More is queued: the commit's writes run beside the applying of it.
            Some(c) if c.dirty => self.commit_beside(),
            Some(c) => self.commit(c),
            None => {}
        }
        true
    }

    /// Applies one record, waiting out transient failures. Returns false if the session must
    /// end.
    fn apply_with_retry(&mut self, rec: &OpRecord) -> bool {
        loop {
            match self.replica.apply(rec) {
                Ok(Outcome::Applied | Outcome::Duplicate | Outcome::Skipped) => break,
                Ok(Outcome::Stripped(privileges)) => {
                    privileges.into_iter().for_each(|p| self.slot.status.stripped.add(p));
                    break;
                }
                Ok(Outcome::Refused(reason)) => {
                    self.refused(rec.seq, reason);
                    break;
                }
                Ok(Outcome::RefusedByPolicy { privilege, reason }) => {
                    self.slot.status.policy_refused.add(privilege);
                    self.refused(rec.seq, reason);
                    break;
                }
                Err(
                    e @ (ApplyError::Io { .. } | ApplyError::State { .. } | ApplyError::OverQuota { .. }),
                ) => {
                    if !self.stalled(&e) {
                        return false;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "stream broken");
                    let _ = self.send(Message::Goodbye { reason: e.to_string() });
                    return false;
                }
            }
        }
        if let Some(paused) = self.stall.succeeded(self.clock.now()) {
            tracing::info!(paused_secs = paused.as_secs(), "replica resumed");
            self.slot.status.set_state(ReplicaState::Replicating);
            let _ = self.send(Message::Resumed);
        }
        true
    }

    /// Queues `m` for the source (dropped if the session is gone).
    fn send(&self, m: Message) -> Result<(), mpsc::error::SendError<Outgoing>> {
        self.tx.blocking_send(Outgoing::from(m))
    }

    /// Counts a refused op and tells the source.
    fn refused(&self, seq: u64, reason: String) {
        self.slot.status.refused.fetch_add(1, Ordering::Relaxed);
        let _ = self.send(Message::OpRefused { seq, reason });
    }

    /// An op failed in a way that may pass: carries out the stall policy's step and waits
    /// for the retry. Returns false if the session ended meanwhile.
    fn stalled(&mut self, e: &ApplyError) -> bool {
        let open = !(self.cancel.is_cancelled() || self.tx.is_closed());
        let step = self.stall.failed(self.clock.now(), open);
        if step.announce {
            tracing::warn!(error = %e, "replica paused; retrying every second");
            self.commit(Commit::CLEAN);
            let _ = self.send(Message::Stalled { reason: e.to_string() });
        }
        self.slot.status.set_state(ReplicaState::Paused(e.to_string()));
        match step.next {
            AfterStall::GiveUp => false,
            AfterStall::RetryAt(at) => {
                self.clock.sleep_until(at);
                true
            }
        }
    }

    /// Lists what `scope` asks for, in chunks, then says the listing ended (with its error).
    /// Each chunk holds its weight of the source's listing budget until it is written, so a
    /// source that asks for listings and does not read them stalls its own sessions only.
    fn list(&self, id: u64, scope: &ListScope) {
        let mut chunk: Vec<Entry> = Vec::with_capacity(LIST_CHUNK);
        let mut bytes = 0;
        let runtime = tokio::runtime::Handle::current();
        let flush = |entries: Vec<Entry>, bytes: usize| {
            let kib = (bytes.div_ceil(1024) as u32).clamp(1, crate::session::LIST_BUDGET_KIB);
            // Waiting for room must not outlive the session (its source may never read).
            let held = runtime
                .block_on(async {
                    tokio::select! {
                        _ = self.cancel.cancelled() => None,
                        p = self.listings.budget.clone().acquire_many_owned(kib) => p.ok(),
                    }
                })
                .ok_or_else(|| std::io::Error::other("session ended"))?;
            self.tx
                .blocking_send(Outgoing { msg: Message::ListEntries { id, entries }, _held: Some(held) })
                .map_err(|_| std::io::Error::other("session closed"))
        };
        let known = self.listings.known.as_deref();
        let per = doppel_apply::listing::BLOCKS_PER_ENTRY;
        let selection = self.replica.selection();
        let result = doppel_apply::listing::list_knowing(
            self.replica.root(),
            scope,
            per,
            known,
            selection,
            &mut |e| {
                bytes += weight(&e);
                chunk.push(e);
                if chunk.len() >= LIST_CHUNK || bytes >= LIST_CHUNK_BYTES {
                    flush(std::mem::take(&mut chunk), std::mem::take(&mut bytes))?;
                }
                Ok(())
            },
        );
        if !chunk.is_empty() {
            let _ = flush(chunk, bytes);
        }
        let error = result.err().map(|e| e.to_string());
        let _ = self.send(Message::ListEnd { id, error });
    }
}

/// A commit whose thread died without an answer.
fn flush_lost() -> ApplyError {
    ApplyError::State {
        path: std::path::PathBuf::from("(commit thread)"),
        source: std::io::Error::other("the commit's thread ended without an answer"),
    }
}

/// A message for the source, with the budget it holds until written.
pub struct Outgoing {
    msg: Message,
    _held: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl From<Message> for Outgoing {
    fn from(msg: Message) -> Outgoing {
        Outgoing { msg, _held: None }
    }
}

impl std::borrow::Borrow<Message> for Outgoing {
    fn borrow(&self) -> &Message {
        &self.msg
    }
}
