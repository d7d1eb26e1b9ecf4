//! The apply loop of a session, on a blocking thread.
//!
//! Ops are applied as they arrive and committed in groups: at most once per commit interval
//! (100 ms by default; a quiet queue commits when the interval since the last commit has
//! passed), at once after an `Fsync` op (a source waiting in sync mode, or an application that
//! asked for durability, should not wait for a timer), or after a large amount of data. Each
//! commit is one `syncfs` and one checkpoint, then an ack: this is what lets thousands of small
//! ops per second be durable without a flush per op. Committing whenever the queue was
//! momentarily empty instead made a stream of small ops commit (and `syncfs` the whole file
//! system) hundreds of times a second.
//!
//! An op that fails for lack of space (or another error that may pass) is retried, not
//! skipped: the worker commits what it has, reports the pause, and tries again every second
//! until it succeeds or the session ends. Nothing is lost, and the source, receiving no acks,
//! stops sending once its window is full.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use doppel_apply::{ApplyError, Outcome, Replica};
use doppel_proto::{Entry, ListScope, Message, Op, OpRecord};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::registry::Slot;

/// Work for the apply loop, in stream order.
pub enum Work {
    /// Records to apply.
    Records(Vec<OpRecord>),
    /// A listing to produce (after everything before it is applied).
    List {
        /// Request id.
        id: u64,
        /// What to list.
        scope: ListScope,
    },
}

/// Commit after this much data even if more is queued.
const COMMIT_BYTES: u64 = 64 << 20;
/// Entries per listing message, at most.
const LIST_CHUNK: usize = 256;
/// Approximate bytes per listing message, at most (well under the frame cap).
const LIST_CHUNK_BYTES: usize = 4 << 20;

/// Roughly what an entry weighs on the wire.
fn weight(e: &Entry) -> usize {
    128 + e.path.0.len()
        + e.link_target.len()
        + e.blocks.len() * 32
        + e.xattrs.iter().map(|x| x.name.len() + x.value.len()).sum::<usize>()
}

/// Runs until `rx` closes (the session ended) or the session is cancelled; returns the
/// replica for the next session.
pub fn run(
    mut replica: Replica,
    mut rx: mpsc::Receiver<Work>,
    tx: mpsc::Sender<Message>,
    slot: Arc<Slot>,
    commit_interval: Duration,
    cancel: CancellationToken,
) -> Replica {
    let status = &slot.status;
    let mut last_commit = Instant::now();
    let mut bytes_since = 0u64;
    let mut acked = replica.durable();
    let runtime = tokio::runtime::Handle::current();
    // `more`: ops are already queued behind this commit, so the checkpoint may say "dirty"
    // at once (it would be rewritten so before the next op anyway).
    let commit_then = |replica: &mut Replica, acked: &mut u64, more: bool| -> Result<(), ApplyError> {
        let seq = if more { replica.commit_continuing()? } else { replica.commit()? };
        status.durable.store(seq, Ordering::Relaxed);
        if seq > *acked {
            *acked = seq;
            let _ = tx.blocking_send(Message::Ack { seq });
        }
        Ok(())
    };
    let commit = |replica: &mut Replica, acked: &mut u64| commit_then(replica, acked, false);
    loop {
        let work = match rx.try_recv() {
            Ok(w) => w,
            Err(mpsc::error::TryRecvError::Empty) if replica.applied() > acked => {
                // Applied ops wait for the commit that is due at the end of the interval, or
                // for more work to join them.
                let due = last_commit + commit_interval;
                let now = Instant::now();
                let next = if now < due {
                    runtime.block_on(async { tokio::time::timeout(due - now, rx.recv()).await }).ok()
                } else {
                    None
                };
                match next {
                    Some(Some(w)) => w,
                    Some(None) => break,
                    None => {
                        if let Err(e) = commit(&mut replica, &mut acked) {
                            tracing::error!(error = %e, "commit failed");
                        }
                        last_commit = Instant::now();
                        bytes_since = 0;
                        continue;
                    }
                }
            }
            Err(mpsc::error::TryRecvError::Empty) => match rx.blocking_recv() {
                Some(w) => w,
                None => break,
            },
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        };
        match work {
            Work::Records(recs) => {
                let mut barrier = false;
                for rec in &recs {
                    if !apply_with_retry(&mut replica, rec, &tx, &slot, &cancel, &mut acked, &commit) {
                        // The session is over (broken stream or gone peer): keep what was
                        // applied durable, and make the reader stop too.
                        if let Err(e) = commit(&mut replica, &mut acked) {
                            tracing::error!(error = %e, "commit failed");
                        }
                        cancel.cancel();
                        return replica;
                    }
                    barrier |= matches!(rec.op, Op::Fsync { .. });
                    bytes_since += rec.op.data_len() as u64;
                }
                status.applied.store(replica.applied(), Ordering::Relaxed);
                if barrier || bytes_since >= COMMIT_BYTES || last_commit.elapsed() >= commit_interval {
                    if let Err(e) = commit_then(&mut replica, &mut acked, !rx.is_empty()) {
                        tracing::error!(error = %e, "commit failed");
                    }
                    last_commit = Instant::now();
                    bytes_since = 0;
                }
            }
            Work::List { id, scope } => {
                let mut chunk: Vec<Entry> = Vec::with_capacity(LIST_CHUNK);
                let mut bytes = 0;
                let result = doppel_apply::listing::list(replica.root(), &scope, &mut |e| {
                    bytes += weight(&e);
                    chunk.push(e);
                    if chunk.len() >= LIST_CHUNK || bytes >= LIST_CHUNK_BYTES {
                        bytes = 0;
                        let entries = std::mem::take(&mut chunk);
                        tx.blocking_send(Message::ListEntries { id, entries })
                            .map_err(|_| std::io::Error::other("session closed"))?;
                    }
                    Ok(())
                });
                if !chunk.is_empty() {
                    let _ = tx.blocking_send(Message::ListEntries { id, entries: chunk });
                }
                let error = result.err().map(|e| e.to_string());
                let _ = tx.blocking_send(Message::ListEnd { id, error });
            }
        }
    }
    if let Err(e) = commit(&mut replica, &mut acked) {
        tracing::error!(error = %e, "final commit failed");
    }
    replica
}

/// Applies one record, waiting out transient failures. Returns false if the session must end.
fn apply_with_retry(
    replica: &mut Replica,
    rec: &OpRecord,
    tx: &mpsc::Sender<Message>,
    slot: &Slot,
    cancel: &CancellationToken,
    acked: &mut u64,
    commit: &dyn Fn(&mut Replica, &mut u64) -> Result<(), ApplyError>,
) -> bool {
    let mut paused = false;
    loop {
        match replica.apply(rec) {
            Ok(Outcome::Applied | Outcome::Duplicate) => break,
            Ok(Outcome::Refused(reason)) => {
                slot.status.refused.fetch_add(1, Ordering::Relaxed);
                let _ = tx.blocking_send(Message::OpRefused { seq: rec.seq, reason });
                break;
            }
            Err(e @ (ApplyError::Io { .. } | ApplyError::State { .. })) => {
                if !paused {
                    tracing::warn!(source = %slot.source, job = %slot.job, error = %e, "replica paused; retrying every second");
                    paused = true;
                    let _ = commit(replica, acked);
                    let _ = tx.blocking_send(Message::Stalled { reason: e.to_string() });
                }
                slot.status.set_state(format!("paused: {e}"));
                if cancel.is_cancelled() || tx.is_closed() {
                    return false;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => {
                tracing::error!(source = %slot.source, job = %slot.job, error = %e, "stream broken");
                let _ = tx.blocking_send(Message::Goodbye { reason: e.to_string() });
                return false;
            }
        }
    }
    if paused {
        tracing::info!(source = %slot.source, job = %slot.job, "replica resumed");
        slot.status.set_state("replicating");
        let _ = tx.blocking_send(Message::Resumed);
    }
    true
}
