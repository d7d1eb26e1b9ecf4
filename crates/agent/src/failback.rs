//! The source side of a failback (`doppel protect --failback`).
//!
//! The repaired source asks the target for its job back ([`Message::FailbackHello`]); the
//! target answers as a source would (a `Hello`), and from then on this side is a target: an
//! embedded one whose replica is the job's own tree. The DR side compares the tree with the
//! replica block by block and sends only what differs (the tree may hold an old copy, or
//! nothing), then streams the workload's changes until the operator's cutover ends the stream
//! with the handover. The tree then equals the replica; [`adopt_replica`] records that, and
//! ordinary protection resumes at the new epoch without comparing anything.
//!
//! The tree keeps what the job's rules leave out (scratch files, caches): those names are
//! never listed to the DR side, and ops on them are skipped (see [`doppel_apply::outside`]),
//! exactly as forward protection never reads them.
//!
//! Links break; every break is followed by a new connection that resumes where the last one
//! stopped (the embedded target keeps its replica state, the DR side its spool).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use doppel_apply::listing::KnownBlocks;
use doppel_fs::{Meta, Selection};
use doppel_link::{ByteCounter, FrameReader, FrameWriter, Identity, LinkError};
use doppel_mirror::index::{Index, Snapshot};
use doppel_proto::{BlockHash, EntryKind, Hello, Message, PROTOCOL_VERSION, Refusal, RelPath};
use doppel_target::{Layout, Target, TargetConfig};
use tokio::io::BufReader;
use tokio_util::sync::CancellationToken;

use crate::handover::{Adopted, adopt_replica, lock_job};
use crate::{AgentError, Connector, Destination, JobConfig};

/// How a failback of one job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The job was handed back: its tree equals the replica, protection resumes from here.
    HandedBack(Adopted),
    /// The target says the job is not failed over (it never was, or the handover happened
    /// and its last message was lost): ordinary protection resumes with a comparison.
    NotFailedOver,
    /// Stopped by a signal before the handover.
    Stopped,
}

/// Why a failback could not go on.
#[derive(Debug, thiserror::Error)]
pub enum FailbackError {
    /// The job's configuration does not allow a failback.
    #[error("{0}")]
    Config(String),
    /// The target refused, for a reason retrying cannot fix.
    #[error("the target refused the failback: {0}")]
    Refused(Refusal),
    /// The job's state.
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// Receives `job`'s tree back from its target, then records the handover.
pub async fn receive(
    job: &JobConfig,
    home: &std::path::Path,
    shutdown: CancellationToken,
) -> Result<Outcome, FailbackError> {
    receive_with(job, home, shutdown, |_| {}).await
}

/// [`receive`], first handing `watch` the embedded target that applies the replica to the
/// tree (its status tells what was received and applied, for a progress display; its
/// `shutdown` is cancelled when the failback ends, whichever way).
pub async fn receive_with(
    job: &JobConfig,
    home: &std::path::Path,
    shutdown: CancellationToken,
    watch: impl FnOnce(&std::sync::Arc<Target>),
) -> Result<Outcome, FailbackError> {
    let Destination::Remote { addr, target_id } = &job.dest else {
        return Err(FailbackError::Config(format!(
            "job {}: a failback comes from a remote target, not from {}",
            job.name, job.dest
        )));
    };
    // Held throughout: no agent may protect the tree while it is being replaced.
    let lock = lock_job(home, &job.name)?;
    std::fs::create_dir_all(&job.root).map_err(|e| AgentError::Io { path: job.root.clone(), source: e })?;
    let root =
        std::fs::canonicalize(&job.root).map_err(|e| AgentError::Io { path: job.root.clone(), source: e })?;
    let (me, _) = Identity::load_or_create(home).map_err(|e| FailbackError::Config(e.to_string()))?;
    let connector = Connector::remote(addr, &me, *target_id, Vec::new())
        .map_err(|e| FailbackError::Config(e.to_string()))?;
    let state = lock.dir.join("failback-target");
    let mut cfg = TargetConfig::new(Layout::Embedded { replica: root, state: state.clone() });
    // The source's own tree receiving its replica back keeps no history (and no attic beside it).
    cfg.history = None;
    // The names the job's rules leave out are the tree's own: the DR side never lists them,
    // so it never removes or replaces them, and its ops on such names are skipped.
    cfg.selection =
        Selection::new(&job.include, &job.exclude).map_err(|e| FailbackError::Config(e.to_string()))?;
    let indexed = IndexedBlocks::open(&lock.dir, job.index_cache).map(Arc::new);
    cfg.known_blocks = indexed.clone().map(|i| i as Arc<dyn KnownBlocks>);
    // Closed however this ends: sessions may outlive it a moment, and protection may resume
    // in this process at once (which opens the index).
    let closing = indexed.map(Closing);
    let target = Target::new(cfg);
    watch(&target);
    let mut backoff = Duration::from_millis(200);
    let handover = loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => {
                target.shutdown.cancel();
                return Ok(Outcome::Stopped);
            }
            a = session(&connector, &target, &job.name) => a,
        };
        match attempt {
            Ok(Some(h)) => break h,
            Ok(None) => tracing::info!(job = %job.name, "the failback stream ended; reconnecting"),
            Err(End::Refused(Refusal::NotFailedOver { .. })) => {
                tracing::warn!(job = %job.name, "the target says the job is not failed over: resuming protection with a comparison");
                target.shutdown.cancel();
                return Ok(Outcome::NotFailedOver);
            }
            Err(End::Refused(r @ (Refusal::Busy | Refusal::Other { .. }))) => {
                tracing::warn!(job = %job.name, reason = %r, retry_in = ?backoff, "failback refused for now");
            }
            Err(End::Refused(r)) => {
                target.shutdown.cancel();
                return Err(FailbackError::Refused(r));
            }
            Err(End::Link(e)) => {
                tracing::warn!(job = %job.name, error = %e, retry_in = ?backoff, "failback link down")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                target.shutdown.cancel();
                return Ok(Outcome::Stopped);
            }
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    };
    target.shutdown.cancel();
    // The handover opens the index again: its view here must be closed first.
    drop(closing);
    let adopted =
        Adopted { replica_id: handover.replica_id, epoch: handover.epoch, applied_seq: handover.applied_seq };
    adopt_replica(job, &lock, adopted)?;
    // The embedded replica state described this one failback only.
    let _ = std::fs::remove_dir_all(&state);
    tracing::info!(job = %job.name, epoch = adopted.epoch, "job handed back: protection resumes");
    Ok(Outcome::HandedBack(adopted))
}

/// The job's own index, for the failback's listings: a file unchanged since the index was
/// saved holds exactly the blocks the index records, and when the target had acknowledged
/// every op that save accounts for, the replica received exactly that content. Such a file is
/// listed from the index (vouched for, not read), so the failback's first pass reads only the
/// files changed since, on both sides, instead of hashing the whole tree twice.
struct IndexedBlocks {
    /// The index and a read view of it as saved; `None` once closed.
    view: parking_lot::Mutex<Option<(Index, Snapshot)>>,
    saved_at_us: u64,
}

impl std::fmt::Debug for IndexedBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexedBlocks").field("saved_at_us", &self.saved_at_us).finish_non_exhaustive()
    }
}

impl IndexedBlocks {
    /// The index of the job whose directory is `dir`, if it can vouch for anything: it was
    /// saved, and everything it accounts for was acknowledged by the target. Anything else
    /// (no index, an unreadable one, ops saved but never acknowledged) means every file is
    /// read, as on first contact.
    fn open(dir: &Path, cache: usize) -> Option<IndexedBlocks> {
        let path = dir.join(crate::agent::INDEX_FILE);
        if !path.exists() {
            return None;
        }
        let acked = match doppel_spool::acked_in(&dir.join("spool")) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "the spool's acknowledged sequence is unreadable: the failback reads every file");
                return None;
            }
        };
        let (index, saved) = match Index::open(&path, cache) {
            Ok(opened) => opened,
            Err(e) => {
                tracing::warn!(error = %e, "the job's index is unreadable: the failback reads every file");
                return None;
            }
        };
        let saved = saved?;
        if saved.captured_seq > acked {
            tracing::info!(
                saved = saved.captured_seq,
                acked,
                "the index was saved with ops the target never acknowledged: the failback reads every file"
            );
            return None;
        }
        let snapshot = index.saved_view().ok()?;
        tracing::info!(
            saved_at_us = saved.saved_at_us,
            captured = saved.captured_seq,
            acked,
            "the job's index vouches for the files unchanged since it was saved"
        );
        Some(IndexedBlocks {
            view: parking_lot::Mutex::new(Some((index, snapshot))),
            saved_at_us: saved.saved_at_us,
        })
    }

    /// Closes the index: nothing is vouched for from here on.
    fn close(&self) {
        self.view.lock().take();
    }
}

/// Closes an [`IndexedBlocks`] when dropped.
struct Closing(Arc<IndexedBlocks>);

impl Drop for Closing {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl KnownBlocks for IndexedBlocks {
    fn blocks(&self, path: &RelPath, meta: &Meta) -> Option<Vec<BlockHash>> {
        let view = self.view.lock();
        let e = view.as_ref()?.1.get(path).ok()??;
        (e.kind == EntryKind::File && e.settled(meta, self.saved_at_us)).then_some(e.blocks)
    }
}

enum End {
    Link(LinkError),
    Refused(Refusal),
}

/// One connection: asks for the job, then serves the DR side's stream into the tree.
async fn session(
    connector: &Connector,
    target: &Arc<Target>,
    job: &str,
) -> Result<Option<doppel_target::Handover>, End> {
    let (sent, received) = (ByteCounter::default(), ByteCounter::default());
    let conn = connector.connect(&sent, &received).await.map_err(End::Link)?;
    let mut stream = BufReader::with_capacity(256 << 10, conn);
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        job: job.to_string(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        replica_id: None,
        epoch: 0,
    };
    FrameWriter::new(&mut stream, ByteCounter::default())
        .send_now(&Message::FailbackHello(hello))
        .await
        .map_err(End::Link)?;
    let counted = ByteCounter::default();
    // The DR side answers once its job is up; the first connection of a failback may wait
    // for the replica's index to load.
    let first = tokio::time::timeout(
        Duration::from_secs(120),
        FrameReader::new(&mut stream, target.config.max_frame, counted.clone()).read(),
    )
    .await
    .map_err(|_| End::Link(LinkError::Timeout(Duration::from_secs(120))))?
    .map_err(End::Link)?;
    match first {
        Message::Refused(r) => Err(End::Refused(r)),
        first @ Message::Hello(_) => {
            doppel_target::handle_after(target.clone(), stream, "failback".into(), first, counted)
                .await
                .map_err(End::Link)
        }
        other => Err(End::Link(LinkError::Protocol(format!("expected Hello, got {other:?}")))),
    }
}

#[cfg(test)]
mod tests {
    use doppel_mirror::index::IndexEntry;
    use doppel_spool::{Spool, SpoolLimits};

    use super::*;

    /// A job directory whose index knows `file` (one block, as read now), saved as accounting
    /// for op `captured` (a second from now, or at the file's change time when `racy`), and
    /// whose spool says `acked` was acknowledged.
    fn job(dir: &Path, file: &Path, captured: u64, acked: u64, racy: bool) -> Meta {
        let meta = Meta::lstat(file).unwrap();
        let (mut index, _) = Index::open(&dir.join(crate::agent::INDEX_FILE), 1 << 20).unwrap();
        let mut e = IndexEntry::from_meta(&meta);
        e.blocks = vec![doppel_proto::hash_block(&std::fs::read(file).unwrap())];
        index.insert(&RelPath::new("f").unwrap(), &e).unwrap();
        let ctime_us = (meta.ctime.secs * 1_000_000 + meta.ctime.nanos as i64 / 1000) as u64;
        let saved_at = if racy { ctime_us } else { doppel_link::framed::now_us() + 1_000_000 };
        index.save(saved_at, captured).unwrap();
        let (spool, _) = Spool::open(&dir.join("spool"), SpoolLimits::default()).unwrap();
        spool.reset(acked).unwrap();
        meta
    }

    fn known(i: &IndexedBlocks, meta: &Meta) -> Option<Vec<BlockHash>> {
        i.blocks(&RelPath::new("f").unwrap(), meta)
    }

    /// The index vouches for a file only when the file is unchanged since a save made well
    /// after its last change, and the target acknowledged every op that save accounts for;
    /// a closed view vouches for nothing.
    #[test]
    fn the_index_vouches_only_for_settled_files_it_saved_with_acknowledged_ops() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("f");
        std::fs::write(&file, b"content").unwrap();
        let dir = d.path().join("job");
        std::fs::create_dir_all(&dir).unwrap();
        assert!(IndexedBlocks::open(&dir, 1 << 20).is_none(), "no index, nothing vouched");
        let meta = job(&dir, &file, 5, 5, false);
        let i = IndexedBlocks::open(&dir, 1 << 20).expect("a saved, acknowledged index");
        assert_eq!(known(&i, &meta), Some(vec![doppel_proto::hash_block(b"content")]));
        // Changed since (same size): the times differ, so the file must be read.
        std::fs::write(&file, b"CONTENT").unwrap();
        assert_eq!(known(&i, &Meta::lstat(&file).unwrap()), None);
        i.close();
        assert_eq!(known(&i, &meta), None);
        drop(i);
        // Saved with an op the target never acknowledged: nothing is vouched for.
        let meta = job(&dir, &file, 6, 5, false);
        assert!(IndexedBlocks::open(&dir, 1 << 20).is_none());
        // Saved within the clock's granularity of the file's last change: racy, read it.
        job(&dir, &file, 5, 5, true);
        let i = IndexedBlocks::open(&dir, 1 << 20).unwrap();
        assert_eq!(known(&i, &meta), None);
    }
}
